"""MTA (Merge-then-Adapt): anchors, retrieval, fusion, and the whole method on the tiny model."""
import json

import numpy as np
import pytest
import torch

from shared.method import mta as M


def test_kmeans_anchor_is_the_longest_history_of_each_cluster():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 10
    x = np.concatenate([c + rng.normal(0, 0.1, (5, 8)) for c in centres])
    history = [3, 9, 4, 9, 1,   2, 2, 7, 2, 2,   5, 6, 1, 1, 8]
    anchors, labels = M.select_anchors(x, history, 3, seed=1)
    assert sorted(np.bincount(labels)) == [5, 5, 5]
    assert sorted(anchors) == [1, 7, 14]  # first of the longest in each cluster
    assert M.select_anchors(x, history, 3, seed=1)[0] == anchors  # seeded: deterministic


def _bank(n=4, h=6):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, h))
    return M.Bank([{} for _ in range(n)], emb, np.zeros(h, np.float32), [1] * n)


@pytest.mark.parametrize("weighting", ["softmax", "linear"])
def test_retrieval_picks_the_most_similar_anchors(weighting):
    bank = _bank()
    user = 0.8 * bank.embeddings[2] / np.linalg.norm(bank.embeddings[2]) \
        + 0.5 * bank.embeddings[0] / np.linalg.norm(bank.embeddings[0])
    idx, w, sims = M.retrieve(user, bank, top_k=2, weighting=weighting, temperature=0.1)
    assert idx == list(np.argsort(-sims)[:2])
    assert sims[idx[0]] >= sims[idx[1]] >= np.delete(sims, idx).max()
    assert np.isclose(w.sum(), 1.0) and w[0] >= w[1] > 0
    if weighting == "linear":
        assert np.allclose(w, sims[idx] / sims[idx].sum())
    else:
        assert np.isclose(w[0] / w[1], np.exp((sims[idx[0]] - sims[idx[1]]) / 0.1))


def test_centering_measures_cosines_from_the_bank_centre():
    bank = _bank()
    bank.center = bank.embeddings.mean(0).astype(np.float32)
    user = bank.embeddings[3] + 0.01
    idx, _, sims = M.retrieve(user, bank)
    assert idx[0] == 3 and np.isclose(sims[3], 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def tiny():
    from client.trainer import get_model
    from shared.runtime.config import load_config
    cfg = load_config("tiny")
    model, tok = get_model(cfg)
    return cfg, model, tok


def _random_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.part_state("population").items()}


def test_merged_lora_is_the_weighted_sum_and_the_backbone_comes_back(tiny):
    cfg, model, _ = tiny
    if model.merged:
        model.unmerge_population()
    loras = [_random_lora(model, s) for s in (1, 2)]
    w = np.array([0.7, 0.3])
    before = {n: layer.base.weight.detach().clone() for n, layer in model.layers()}
    with M.folded(model, loras, w):
        assert model.merged
        for name, layer in model.layers():
            expect = sum(wi * layer.scaling * (lo[f"{name}.lora_B"] @ lo[f"{name}.lora_A"]) for lo, wi in zip(loras, w))
            got = layer.base.weight - before[name]
            assert torch.allclose(got, expect.T if layer.fan_in_fan_out else expect, atol=1e-6), name
    assert not model.merged
    for name, layer in model.layers():
        assert torch.equal(layer.base.weight, before[name]), name  # restored exactly


def test_one_folded_anchor_computes_what_the_unmerged_lora_computes(tiny):
    cfg, model, _ = tiny
    lora = _random_lora(model, 3)
    ids = torch.randint(0, 50, (2, 7))
    model.load_part_state("population", lora)
    model.set_stage("population")
    with torch.no_grad():
        ref = model.lm(input_ids=ids).logits
    model.reset_part("population")
    with M.folded(model, [lora], [1.0]), torch.no_grad():
        model.set_stage("population")
        got = model.lm(input_ids=ids).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_bank_round_trips_through_a_file(tmp_path, tiny):
    _, model, _ = tiny
    bank = M.Bank([_random_lora(model, 4), _random_lora(model, 5)], np.ones((2, 3), np.float32),
                  np.zeros(3, np.float32), [7, 9])
    bank.save(tmp_path / "bank.safetensors")
    back = M.Bank.load(tmp_path / "bank.safetensors")
    assert back.history == [7, 9] and np.array_equal(back.embeddings, bank.embeddings)
    for a, b in zip(bank.loras, back.loras):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a whole `proper local` run
def test_mta_end_to_end_on_the_tiny_model(tmp_path):
    from shared.runtime.config import load_config
    from sim.local import run_local
    cfg = load_config("tiny", ["method=mta", "mta.anchors=2", "mta.anchor.epochs=2", "mta.user.epochs=1",
                               "data.holdout=1", "eval.splits=[test,val]"])
    rows = run_local(cfg, tmp_path / "run")
    stages = [(r["stage"], r["split"]) for r in rows]
    for split in ("test", "val"):
        for stage in ("base", "mta_merge", "mta"):
            assert (stage, split) in stages
    assert all(r["users"] == 4 for r in rows)
    run = tmp_path / "run"
    bank = M.Bank.load(run / "mta_bank.safetensors")
    assert len(bank) == 2 and bank.embeddings.shape[0] == 2
    state = run / "client_state"
    # per user: the stacked LoRA and the retrieved anchors, nothing else (no embedding on disk)
    files = sorted(p.name.split(".", 1)[1] for p in state.iterdir())
    assert files == ["mta.safetensors"] * 4 + ["mta_user"] * 4
    from shared.runtime.persist import load_tensors
    rec, _ = load_tensors(next(state.glob("*.mta.safetensors")))
    assert set(rec) == {"anchors", "weights"} and rec["anchors"].shape == (2,)
    assert np.isclose(float(rec["weights"].sum()), 1.0)
    adapter = json.loads(next(state.glob("*.mta_user")).joinpath("adapter_config.json").read_text())
    assert adapter["r"] == cfg.adapters.r_user
    kinds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert {"mta_bank", "mta_user"} <= {k["stage"] for k in kinds if k["kind"] == "train"}


@pytest.mark.slow  # a whole `proper sim` run
def test_federated_mta_keeps_embeddings_of_non_candidates_and_all_user_loras_on_clients(tmp_path):
    """4 simulated users, 2 per client: each client nominates 1 candidate, so 2 embeddings of 4 leave."""
    from sim.run import run_sim
    rc = run_sim("tiny", [f"output.dir={tmp_path}", "output.name=fed", "method=mta", "federation.users_per_client=2",
                          "federation.audit_replies=true", "mta.anchors=2", "mta.anchor.epochs=1", "mta.user.epochs=1"])
    assert rc == 0
    run = tmp_path / "fed"
    rows = json.loads((run / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "mta_merge", "mta"] and all(r["users"] == 4 for r in rows)
    assert len(M.Bank.load(run / "mta_bank.safetensors")) == 2
    replies = [json.loads(line) for f in (run / "wire").glob("*.jsonl") for line in f.read_text().splitlines()]
    types = sorted(r["message_type"] for r in replies)
    assert types.count("query.mta_candidates") == 2 and types.count("train.mta_user") == 2
    for r in replies:
        blob = json.dumps({k: v for k, v in r.items() if k != "message_type"})
        for forbidden in ("user_A", "user_B", "router_g", "mta_user", "u000"):
            assert forbidden not in blob
        if r["message_type"] == "query.mta_candidates":
            assert r["arrays"]["candidates"]["embeddings"]["shape"][0] == 1  # one nominee per client
        elif r["message_type"] == "train.mta_anchor":
            assert all(k.startswith("anchor.") for k in r["arrays"])
            assert all(key.endswith((".lora_A", ".lora_B")) for rec in r["arrays"].values() for key in rec)
        else:
            assert r["arrays"] == {}
    stored = sorted(p.name.split(".", 1)[1] for p in (run / "clients").glob("*/*"))
    assert stored == ["mta.safetensors"] * 4 + ["mta_user"] * 4
