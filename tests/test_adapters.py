"""The three PROPER adapters on the tiny model: what trains, what is exact, what the losses do."""

import pytest
import torch

from shared.data.lamp import Example, User
from shared.method.stages import constraint_loss, train_group, train_population, train_user, user_mixtures
from shared.runtime.config import stage_defaults
from tests.helpers import logits, make_model, randomize


def users(n=3, per_user=4):
    out = []
    for u in range(n):
        ex = [Example(f"{u}/{i}", f"u{u}", f"description: movie {i} of user {u}", ["comedy", "action"][u % 2])
              for i in range(per_user)]
        out.append(User(f"u{u}", ex, [], ex[:1]))
    return out


CFG = stage_defaults(epochs=1, batch_size=4, lr=1e-2, max_len=48, bf16=False,
                        constraint_weight=0.5)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_targets_are_the_ffn_layers():
    model, _ = make_model()
    names = model.layer_names
    assert len(names) == 3 * model.lm.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[1] in ("gate_proj", "up_proj", "down_proj") for n in names)


def test_population_stage_trains_only_the_population_lora():
    model, tok = make_model()
    before = snapshot(model)
    train_population(model, tok, users(), CFG)
    diff = changed(before, model)
    assert diff and all(n.endswith((".lora_A", ".lora_B")) for n in diff), diff


def test_group_stage_trains_experts_routers_and_embeddings_only():
    model, tok = make_model()
    randomize(model, "population")
    model.merge_population()
    before = snapshot(model)
    emb = torch.randn(3, 16)
    result, new_emb = train_group(model, tok, users(), emb, CFG)
    diff = changed(before, model)
    group_names = (".expert_A", ".expert_B", ".router_h", ".router_u")
    assert diff and all(n.endswith(group_names) for n in diff), diff
    assert any(n.endswith(".expert_B") for n in diff) and any(n.endswith(".router_u") for n in diff)
    assert not torch.equal(emb, new_emb)  # e_u trains too (privately)
    assert result.routing_mass.shape == (len(model.layer_names), model.k)
    assert result.mixtures.shape == (3, len(model.layer_names), model.k)
    assert torch.allclose(result.mixtures.sum(-1), torch.ones(3, len(model.layer_names)), atol=1e-5)
    assert set(result.shared) == set(model.part_state("group"))


def test_user_stage_trains_only_the_user_lora_and_lora_aware_router():
    model, tok = make_model()
    randomize(model, "population")
    model.merge_population()
    randomize(model, "group", seed=2)
    before = snapshot(model)
    train_user(model, tok, users()[0], torch.randn(16), CFG)
    diff = changed(before, model)
    user_names = (".user_A", ".user_B", ".router_g", ".router_g_bias")
    assert diff and all(n.endswith(user_names) for n in diff), diff
    assert any(n.endswith(".router_g") for n in diff) and any(n.endswith(".user_B") for n in diff)


def test_stage3_starts_exactly_at_the_users_stage2_model():
    model, _ = make_model()
    randomize(model, "population")
    model.merge_population()
    randomize(model, "group", seed=2)
    emb = torch.randn(1, 16)
    model.set_stage("group")
    stage2 = logits(model, emb)
    model.reset_part("user", seed=5)
    model.set_stage("user")
    stage3 = logits(model, emb)
    assert torch.equal(stage2, stage3)
    # ...and it is not trivially equal: a trained user part moves it
    randomize(model, "user", seed=3)
    assert not torch.allclose(logits(model, emb), stage2)


def test_users_route_differently():
    model, _ = make_model()
    randomize(model, "group", seed=2)
    model.set_stage("group")
    a, b = logits(model, torch.randn(1, 16)), logits(model, torch.randn(1, 16))
    assert not torch.allclose(a, b)


def test_merge_equals_unmerged_population_and_unmerge_restores_backbone():
    model, _ = make_model()
    model.set_stage("base")
    bare = logits(model)
    weights = [layer.base.weight.clone() for _, layer in model.layers()]
    randomize(model, "population")
    model.set_stage("population")
    unmerged = logits(model)
    model.merge_population()
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    assert not torch.equal(model.layers()[0][1].base.weight, weights[0])
    model.unmerge_population()
    model.set_stage("base")
    assert torch.allclose(logits(model), bare, atol=1e-5)
    # bit for bit: a long-lived client that goes back to the bare backbone trains as a fresh one
    assert all(torch.equal(layer.base.weight, w) for (_, layer), w in zip(model.layers(), weights))


def test_stacked_experts_equal_a_loop_over_experts():
    model, _ = make_model()
    randomize(model, "group", seed=4)
    layer = model.layers()[0][1]
    x = torch.randn(2, 5, layer.in_features)
    w = torch.softmax(torch.randn(2, 5, layer.k), -1)
    ref = sum(w[..., e:e + 1] * (x @ layer.expert_A[e].T @ layer.expert_B[e].T) * layer.expert_scaling
              for e in range(layer.k))
    assert torch.allclose(layer.mix_experts(x, w), ref, atol=1e-5)


def test_constraint_loss_pushes_two_users_mixtures_apart():
    model, tok = make_model()
    randomize(model, "group", seed=2)
    model.set_stage("group", train=True)
    emb = torch.nn.Parameter(torch.randn(2, 16) * 0.1)
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    uidx = torch.tensor([0, 1])
    opt = torch.optim.Adam(model.trainable_parameters() + [emb], lr=5e-2)

    def similarity():
        with model.users(emb[uidx], record=True) as ctx:
            model.lm(input_ids=ids, attention_mask=mask)
        p, _, _ = user_mixtures(ctx.betas, mask, uidx)
        return constraint_loss(p)

    start = similarity().item()
    for _ in range(30):
        loss = similarity()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = similarity().item()
    assert end < start - 0.05, (start, end)


def test_constraint_loss_counts_other_clients_mixtures():
    p = torch.tensor([[[0.9, 0.1]]])
    same = torch.tensor([[[0.9, 0.1]]])
    apart = torch.tensor([[[0.1, 0.9]]])
    assert constraint_loss(p) == 0  # one user alone: no pair
    assert constraint_loss(p, same) > constraint_loss(p, apart)


def test_answer_loss_equals_the_full_lm_loss():
    from shared.method.stages import answer_loss, lm_loss
    model, _ = make_model()
    randomize(model, "population")
    model.set_stage("population")
    ids = torch.randint(3, 250, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 6:9] = ids[:, 6:9]
    labels[2, 7:] = -100
    with torch.no_grad():
        full = lm_loss(model.lm(input_ids=ids, attention_mask=mask).logits, labels)
        fast = answer_loss(model.lm, ids, mask, labels)
    assert torch.allclose(full, fast, atol=1e-5)


def test_label_scoring_with_a_shared_prompt_cache_equals_full_forwards():
    # eval.mode=score runs the prompt once and shares its KV cache across the labels; it must give
    # the log-probabilities that one full forward per (prompt + label) gives, at the user stage
    # (user-aware and LoRA-aware routers active) as at the others.
    from shared.evaluation.evaluate import label_logprobs, score_labels
    model, tok = make_model()
    randomize(model, "population")
    model.merge_population()
    randomize(model, "group", seed=2)
    randomize(model, "user", seed=3)
    model.set_stage("user")
    labels = ["comedy", "action", "science fiction", "dark comedy"]
    prompts = [tok("description: a long film about ships at sea, and their crews\nAnswer:")["input_ids"],
               tok("description: two friends\nAnswer:")["input_ids"],
               tok("description: a dog\nAnswer:")["input_ids"]]
    emb = torch.randn(3, 16)
    fast = label_logprobs(model, tok, prompts, labels, emb, bf16=False)             # one left-padded batch
    ref = torch.zeros(3, len(labels))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, lab in enumerate(labels):
                t = tok(" " + lab, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                logp = torch.log_softmax(model(torch.tensor([p + t]), user_emb=emb[i:i + 1]).logits[0], -1)
                ref[i, j] = sum(logp[len(p) - 1 + k, t[k]] for k in range(len(t)))
    assert len({len(tok(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels}) > 1
    assert torch.allclose(fast, ref, atol=1e-4), (fast, ref)
    assert torch.allclose(label_logprobs(model, tok, prompts, labels, emb, bf16=False, batch_size=2), ref, atol=1e-4)
    assert score_labels(model, tok, prompts, labels, emb, bf16=False) == [labels[i] for i in ref.argmax(1)]
    # SDPA packs every label into one row per prompt (a block-causal mask); another attention
    # implementation scores one padded row per label: both equal the full forwards
    import shared.evaluation.evaluate as E
    assert model.lm.config._attn_implementation == "sdpa"
    calls = []
    packed_fn = E._packed_continuations
    E._packed_continuations = lambda *a, **k: calls.append(1) or packed_fn(*a, **k)
    try:
        label_logprobs(model, tok, prompts, labels, emb, bf16=False)
        assert calls, "the SDPA path did not pack"
        model.lm.config._attn_implementation = "eager"
        calls.clear()
        rows = label_logprobs(model, tok, prompts, labels, emb, bf16=False, batch_size=2)
        assert not calls
    finally:
        E._packed_continuations = packed_fn
        model.lm.config._attn_implementation = "sdpa"
    assert torch.allclose(rows, ref, atol=1e-4), (rows, ref)


def test_bf16_auto_is_measured_once_per_machine_and_bad_values_are_refused(monkeypatch, tmp_path):
    import shared.runtime.precision as T
    assert T.use_bf16(True) is True and T.use_bf16(False) is False
    monkeypatch.setenv("PROPER_CACHE", str(tmp_path))
    monkeypatch.delenv("PROPER_BF16", raising=False)

    def never(**kw):
        raise AssertionError("measured where the answer was known")

    # no native kernels: float32, nothing measured
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(T, "measure_cpu_bf16", never)
    assert T.use_bf16("auto") is False
    # native kernels: the measurement decides (the Xeon of docs/results/bench_precision.md had them, 2x slower)
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: True)
    for f32, b16, expected in ((1.0, 2.0, False), (1.0, 0.5, True), (1.0, 0.95, False)):
        T._MEASURED.clear()
        (tmp_path / "precision.json").unlink(missing_ok=True)
        monkeypatch.setattr(T, "measure_cpu_bf16", lambda f32=f32, b16=b16, **kw: {"float32_s": f32, "bf16_s": b16})
        assert T.use_bf16("auto") is expected
        # the autocast context the training loops enter follows the same answer
        with T.autocast({"bf16": "auto"}):
            assert torch.is_autocast_enabled("cpu") is expected
        # another process on this machine reads the kept answer instead of measuring again
        T._MEASURED.clear()
        monkeypatch.setattr(T, "measure_cpu_bf16", never)
        assert T.use_bf16("auto") is expected
        assert "measured" in T.describe_precision("auto")
    monkeypatch.setenv("PROPER_BF16", "1")
    assert T.use_bf16("auto") is True and T.use_bf16(False) is False
    T._MEASURED.clear()
    with pytest.raises(ValueError, match="train.bf16"):
        T.use_bf16("fast")
