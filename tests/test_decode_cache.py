"""Serving keeps derived adapter weights (ProperLinear._frozen): with gradients off, a layer's
concatenated router + expert A weights, its permuted expert B, the user parts and W_u e_u are built
once. The outputs must be exactly those of the uncached computation, and a changed parameter must
never be served from the cache, whoever changed it and however."""
import pytest
import torch

from shared.method.adapters import folds
from shared.method.model import ProperModel
from shared.runtime.backbone import load_backbone
from shared.runtime.targets import find_target_modules
from tests.helpers import make_model, randomize

IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 12, 13]])


def stage3(model_and_tok=None, seed=0):
    model, tok = model_and_tok or make_model(seed=seed)
    randomize(model, "population", seed=1)
    model.merge_population()
    randomize(model, "group", seed=2)
    randomize(model, "user", seed=3)
    model.set_stage("user")
    emb = torch.randn(2, model.d_user, generator=torch.Generator().manual_seed(4))
    return model, emb


def uncached(model, emb, bf16=False):
    """The training path: gradients on, nothing kept (the parameters are frozen, so no graph either)."""
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(IDS, user_emb=emb).logits.detach()


def cached(model, emb, bf16=False):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(IDS, user_emb=emb).logits


def kept(model) -> int:
    return sum(len(layer._kept) for _, layer in model.layers())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", ["group", "user"])
def test_a_cached_forward_equals_the_uncached_one_bit_for_bit(stage, bf16):
    model, emb = stage3()
    model.set_stage(stage)
    want = uncached(model, emb, bf16)
    assert kept(model) == 0
    first = cached(model, emb, bf16)     # builds the kept weights
    assert kept(model) > 0
    second = cached(model, emb, bf16)    # served from them
    assert torch.equal(first, want) and torch.equal(second, want)


def test_multi_user_rows_cached_equal_uncached():
    model, emb = stage3()
    parts = []
    for seed in (5, 6):
        randomize(model, "user", seed=seed)
        parts.append(model.part_state("user"))
    rows = torch.tensor([1, 0])
    with model.user_parts(parts):
        with torch.enable_grad(), model.users(emb, rows=rows):
            want = model.lm(input_ids=IDS).logits.detach()
        with torch.no_grad(), model.users(emb, rows=rows):
            model.lm(input_ids=IDS)
            got = model.lm(input_ids=IDS).logits
        assert kept(model) > 0
    assert kept(model) == 0   # leaving user_parts lets the stacked parts go
    assert torch.equal(got, want)


def test_a_scaling_that_cannot_fold_stays_exact():
    lm, tok = load_backbone("tiny", seed=0)
    model = ProperModel(lm, find_target_modules(lm), d_user=16, alpha_user=6, alpha_group=3, seed=0)
    model, emb = stage3((model, tok))
    for bf16 in (False, True):
        want = uncached(model, emb, bf16)
        cached(model, emb, bf16)
        assert torch.equal(cached(model, emb, bf16), want)


def test_folds_only_powers_of_two_from_one():
    assert folds(1.0) and folds(2.0) and folds(8.0)
    assert not folds(0.5) and not folds(1.5) and not folds(3.0)


def _change_by_load(model, _):
    state = model.part_state("user")
    model.load_part_state("user", {k: v * 1.5 for k, v in state.items()})


def _change_in_place(model, _):
    for _, layer in model.layers():          # behind the model's back: only the version counter knows
        with torch.no_grad():
            layer.expert_B.mul_(-1.0)


def _change_storage(model, _):
    for _, layer in model.layers():          # `.data =`: a new storage, a fresh version counter
        layer.router_h.data = torch.randn_like(layer.router_h)


def _change_by_optimizer(model, emb):
    model.set_stage("user", train=True)
    params = model.trainable_parameters()
    opt = torch.optim.SGD(params, lr=1.0)
    model(IDS, user_emb=emb).logits.float().pow(2).mean().backward()
    opt.step()
    model.set_stage("user")


def _change_embedding_in_place(_, emb):
    emb.mul_(3.0)                            # the same tensor object, new values


@pytest.mark.parametrize("change", [_change_by_load, _change_in_place, _change_storage, _change_by_optimizer,
                                    _change_embedding_in_place])
def test_changed_parameters_are_never_served_stale(change):
    model, emb = stage3()
    before = cached(model, emb)
    assert kept(model) > 0
    change(model, emb)
    after = cached(model, emb)
    assert not torch.equal(after, before)
    assert torch.equal(after, uncached(model, emb))


def test_a_new_batch_of_users_is_routed_with_its_own_embeddings():
    model, emb = stage3()
    cached(model, emb)
    other = emb.flip(0).clone()
    assert torch.equal(cached(model, other), uncached(model, other))


# ---- fused serving of one user (ProperModel.fused): the same model up to rounding, never stale
def fused_out(model, emb, bf16=False):
    with model.fused(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(IDS, user_emb=emb).logits


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", ["group", "user"])
def test_fused_serving_is_the_same_model_up_to_rounding(stage, bf16):
    model, emb = stage3()
    model.set_stage(stage)
    want = cached(model, emb, bf16)
    got = fused_out(model, emb, bf16)
    names = {name for _, layer in model.layers() for name in layer._kept}
    assert f"fused_{stage}" in names                                       # the fused path ran
    tol = 1e-5 if not bf16 else 0.05 * want.abs().max().item()
    assert (got - want).abs().max().item() < tol
    assert torch.equal(fused_out(model, emb, bf16), got)                   # served again from the kept weights
    assert all(not layer.fuse for _, layer in model.layers())              # the context put it back


def test_fused_serving_folds_the_lora_aware_router_and_user_lora():
    """A user part that matters (large W_g, B_u) moves the fused output exactly as the exact path's."""
    model, emb = stage3()
    before = fused_out(model, emb)
    _change_by_load(model, emb)
    after = fused_out(model, emb)
    assert not torch.equal(after, before)
    assert (after - cached(model, emb)).abs().max().item() < 1e-5


@pytest.mark.parametrize("change", [_change_in_place, _change_storage, _change_embedding_in_place])
def test_fused_weights_are_never_served_stale(change):
    model, emb = stage3()
    fused_out(model, emb)
    change(model, emb)
    assert (fused_out(model, emb) - uncached(model, emb)).abs().max().item() < 1e-5


def test_several_users_mixtures_and_recording_keep_the_exact_path_when_fused():
    model, emb = stage3()
    parts = [model.part_state("user")]
    randomize(model, "user", seed=7)
    parts.append(model.part_state("user"))
    rows = torch.tensor([1, 0])
    with model.user_parts(parts), torch.no_grad():
        with model.users(emb, rows=rows):
            want = model.lm(input_ids=IDS).logits
        with model.fused(), model.users(emb, rows=rows):
            assert torch.equal(model.lm(input_ids=IDS).logits, want)
    with torch.no_grad(), model.users(emb, record=True):
        want = model.lm(input_ids=IDS).logits
    with torch.no_grad(), model.fused(), model.users(emb, record=True):
        assert torch.equal(model.lm(input_ids=IDS).logits, want)
    assert not any(name.startswith("fused") for _, layer in model.layers() for name in layer._kept)


def test_fused_serving_runs_a_gpt2_conv1d_base_as_the_exact_path():
    """GPT-2's adapted layers are Conv1D (weight [in, out]): the fused path must run the base as it is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                    bos_token_id=0, eos_token_id=0))
    model, _ = stage3((ProperModel(lm, find_target_modules(lm), k=3, d_user=16, seed=0), None))
    emb = torch.randn(1, model.d_user, generator=torch.Generator().manual_seed(4))   # one user: fused
    want = cached(model, emb)
    got = fused_out(model, emb)
    assert {name for _, layer in model.layers() for name in layer._kept} >= {"fused_user"}
    assert (got - want).abs().max().item() < 1e-5
