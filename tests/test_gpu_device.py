"""Device consistency on a CPU-only machine (CI never has a GPU): tests/device_check.py tags tensors as on
the client's device or on the host and records every operation that mixes the two, as CUDA would refuse.

What passes here: the model's own computation, every stage's forward, backward and optimizer step, the
trainer's population stage and the evaluation's generation loop (their batches placed on the model's
device), and serving's generation, given inputs on the client's device."""
from __future__ import annotations

import pytest
import torch

from shared.method.model import ProperModel
from shared.method.optim import make_optimizer
from shared.runtime.config import load_config, stage_cfg
from shared.runtime.precision import client_device
from tests.device_check import DeviceCheck
from tests.helpers import make_model, randomize

DEVICE = client_device(0)   # "cpu" here; the checker's tags stand in for a second device


def _ids():
    return torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 12, 13]])


def test_the_check_finds_a_batch_left_on_the_host():
    model, _ = make_model()
    model.set_stage("population")
    with DeviceCheck(model) as check, torch.no_grad():
        model(_ids())                  # made on the host, never moved
    assert check.mixes and "embedding" in check.mixes[0]
    with DeviceCheck(model) as check, torch.no_grad():
        model(_ids().to(DEVICE))
    check.check()


def test_the_check_finds_a_host_tensor_made_inside_a_step():
    model, _ = make_model()
    model.set_stage("population")
    with DeviceCheck(model) as check, torch.no_grad():
        out = model(_ids().to(DEVICE)).logits
        out + torch.zeros(out.shape[-1])          # torch.zeros without device=: on the host
    assert len(check.mixes) == 1


def _user_emb(model, n=2):
    return torch.randn(n, model.d_user).to(DEVICE)


@pytest.mark.parametrize("stage", ["population", "group", "user"])
def test_every_stage_trains_on_the_client_device(stage):
    """Forward, loss, backward, clipping and the optimizer step of each stage's trainable part."""
    cfg = load_config("tiny", [])
    model, _ = make_model()
    for part in ("population", "group", "user"):
        randomize(model, part)
    if stage != "population":
        model.merge_population()
    model.set_stage(stage, train=True)
    params = model.trainable_parameters()
    opt = make_optimizer(params, stage_cfg(cfg, stage))
    with DeviceCheck(model) as check:
        ids = _ids().to(DEVICE)
        emb = None if stage == "population" else _user_emb(model)
        out = model(ids, attention_mask=torch.ones_like(ids), user_emb=emb, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    check.check()


def stage3_model():
    """The tiny model with every part random, the population merged, in the user stage."""
    model, tok = make_model()
    for part in ("population", "group", "user"):
        randomize(model, part)
    model.merge_population()
    model.set_stage("user")
    return model, tok


def test_several_users_in_one_batch_stay_on_the_client_device():
    model, _ = stage3_model()
    parts = [model.part_state("user") for _ in range(2)]
    with DeviceCheck(model) as check, torch.no_grad():
        check.client(*[t for p in parts for t in p.values()])
        rows = torch.arange(2).to(DEVICE)
        with model.user_parts(parts), model.users(_user_emb(model), rows=rows):
            model.lm(input_ids=_ids().to(DEVICE))
    check.check()


def test_serving_decodes_on_the_client_device():
    """HF generate over ProperModel's stage-3 model, the fused serving path too (client/serving.py)."""
    model, tok = stage3_model()
    for fused in (False, True):
        with DeviceCheck(model) as check, torch.no_grad():
            ids = _ids().to(DEVICE)
            with model.users(_user_emb(model)), model.fused(fused):
                model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
        check.check()


def test_enrollment_trains_a_new_users_embedding_on_the_client_device(tmp_path):
    """shared/method/serving.py: a new user's e_u, trained on its history (`proper enroll`)."""
    from shared.method.serving import train_embedding
    cfg = stage_cfg(load_config("tiny", []), "group")
    model, tok = make_model()
    randomize(model, "group")
    model.merge_population()
    user = _users(tmp_path)[0]
    with DeviceCheck(model) as check:
        e_u = train_embedding(model, tok, user, torch.randn(model.d_user).to(DEVICE), cfg, passes=1, seed=0)
    check.check()
    assert e_u.device.type == "cpu"   # for the user's private file


def _users(tmp_path, n=2):
    from shared.data.lamp import load_lamp
    from shared.data.synthetic import write_synthetic_lamp
    data = write_synthetic_lamp(tmp_path / "data", n_users=n, n_groups=2, min_profile=4, max_profile=4, seed=1)
    return load_lamp(data, task="LaMP_2", holdout=0)[1]


def test_the_population_stage_of_the_trainer_stays_on_the_client_device(tmp_path):
    from shared.method.stages import train_population
    cfg = stage_cfg(load_config("tiny", []), "population")
    model, tok = make_model()
    with DeviceCheck(model) as check:
        train_population(model, tok, _users(tmp_path), cfg, seed=0)
    check.check()


def test_the_evaluation_generation_loop_stays_on_the_client_device():
    from shared.evaluation.evaluate import generate_tokens
    model, tok = make_model()
    model.set_stage("population")
    with DeviceCheck(model) as check:
        generate_tokens(model, tok, [[5, 6, 7], [8, 9]], None, 2, bf16=False)
    check.check()


def test_the_model_is_built_where_the_client_computes():
    """ProperModel.to(device) moves the adapters with the backbone (one .to, after the seeded CPU init)."""
    model, _ = make_model()
    moved = model.to(DEVICE)
    assert isinstance(moved, ProperModel)
    assert {p.device.type for p in moved.parameters()} == {torch.device(DEVICE).type}


def test_the_group_and_user_stages_of_the_trainer_stay_on_the_client_device(tmp_path):
    """train_group (with the constraint loss's pool and the routing statistics) and train_user: the
    e_u, pool and batches are placed on the model's device; what they return is on the CPU."""
    from shared.method.stages import train_group, train_user
    cfg = load_config("tiny", [])
    model, tok = make_model()
    randomize(model, "population")
    model.merge_population()
    users = _users(tmp_path, n=3)
    emb = torch.randn(len(users), model.d_user)
    pool = torch.softmax(torch.randn(4, len(model.layer_names), model.k), -1)
    with DeviceCheck(model) as check:
        result, e_u = train_group(model, tok, users, emb, stage_cfg(cfg, "group"), others=pool, seed=0)
        train_user(model, tok, users[0], e_u[0], stage_cfg(cfg, "user"), seed=0)
    check.check()
    assert e_u.device.type == "cpu" and result.routing_mass.device.type == "cpu"
