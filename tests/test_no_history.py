"""Users with no history (an empty profile): skipped in training, counted in the table, still
evaluated, served by the population and group stages with the population's mean mixture."""
import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.data.lamp import load_lamp
from shared.data.synthetic import write_synthetic_lamp
from tests.helpers import make_model, randomize
from tests.lamp_files import lamp_question, write_lamp

COLD = "cold"   # the user with no history


def write_data(d: Path, with_cold: bool) -> Path:
    """The tiny config's four synthetic users, and (with_cold) a fifth user with an empty profile."""
    write_synthetic_lamp(d, n_users=4, n_groups=2, min_profile=4, max_profile=8, seed=0)
    if with_cold:
        q = json.loads((d / "questions.json").read_text())
        o = json.loads((d / "outputs.json").read_text())
        q.append({"id": "cold-q", "user_id": COLD, "input": q[0]["input"], "profile": []})
        o["golds"].append({"id": "cold-q", "output": o["golds"][0]["output"]})
        (d / "questions.json").write_text(json.dumps(q))
        (d / "outputs.json").write_text(json.dumps(o))
    return d


def test_an_empty_profile_is_a_user_with_only_its_question(tmp_path):
    d = write_lamp(tmp_path, [lamp_question("a", 3), {**lamp_question("b", 0), "user_id": "ub"}],
                   [{"id": "a", "output": "comedy"}, {"id": "b", "output": "action"}])
    _, users = load_lamp(d, holdout=2)
    assert [(len(u.train), len(u.val), len(u.test)) for u in users] == [(1, 2, 1), (0, 0, 1)]
    assert users[1].user_id == "ub" and users[1].test[0].output == "action"


def test_a_fixed_mixture_replaces_the_router():
    """Under fixed_mixture every layer computes W_p x + sum_e m_e s B_e A_e x with the given m."""
    model, _ = make_model()
    model.merge_population()
    randomize(model, "group")
    model.set_stage("group")
    n_layers = len(model.layer_names)
    mixture = torch.softmax(torch.randn(n_layers, model.k, generator=torch.Generator().manual_seed(3)), -1)
    name, layer = model.layers()[1]
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad(), model.fixed_mixture(mixture):
        got = layer(x)
    want = layer.base(x) + layer.mix_experts(x, mixture[1].expand(2, 3, -1))
    assert torch.allclose(got, want, atol=1e-6), name
    with torch.no_grad():  # outside, the router routes again
        routed = layer(x)
    assert not torch.allclose(routed, got, atol=1e-4)
    with pytest.raises(ValueError, match="mixture for this model"):
        with model.fixed_mixture(mixture[:1]):
            pass


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """proper local on the four users with and without the user with no history; every prediction
    of the run with it, as (stage the model computed, fixed mixture or None, example ids, texts)."""
    import client.predict
    from shared.runtime.config import load_config
    from sim.local import run_local
    tmp = tmp_path_factory.mktemp("nohist")
    calls = []
    real = client.predict.predict

    def spy(model, tokenizer, spec, examples, cfg, **kw):
        out = real(model, tokenizer, spec, examples, cfg, **kw)
        mixture = None if model.ctx.mixture is None else model.ctx.mixture.clone()
        calls.append((model.stage, mixture, [e.id for e in examples], out))
        return out
    runs = {}
    for with_cold in (True, False):
        name = "cold" if with_cold else "warm"
        cfg = load_config("tiny", [f"data.path={write_data(tmp / f'data-{name}', with_cold)}",
                                   "data.holdout=1", "eval.splits=[test,val]"])
        client.predict.predict = spy if with_cold else real
        try:
            run_local(cfg, tmp / name)
        finally:
            client.predict.predict = real
        runs[name] = tmp / name
    return runs, calls


def test_local_run_with_a_user_with_no_history(local_runs):
    runs, _ = local_runs
    run = runs["cold"]
    table = (run / "table.md").read_text()
    assert "users with no history: 1" in table
    rows = json.loads((run / "table.json").read_text())
    assert {r["stage"]: r["users"] for r in rows if r["split"] == "test"} == \
        {"base": 5, "population": 5, "group": 5, "user": 5}
    assert all(r["users"] == 4 for r in rows if r["split"] == "val")  # no history: nothing held out
    with open(run / "per_user.csv", newline="") as f:
        cold = next(row for row in csv.DictReader(f) if row["user"] == COLD)
    assert all(cold[f"{stage}@test"] != "" for stage in ("base", "population", "group", "user")), cold
    assert all(cold[f"{stage}@val"] == "" for stage in ("base", "population", "group", "user")), cold
    # no private state for it: nothing was trained
    assert not list((run / "client_state").glob(f"{COLD}-*"))
    assert len(list((run / "client_state").glob("*.embedding.safetensors"))) == 4


def test_a_user_with_no_history_changes_nothing_that_is_trained(local_runs):
    runs, _ = local_runs
    for name in ("group.safetensors", "population_lora/adapter_model.safetensors"):
        cold, warm = load_file(str(runs["cold"] / name)), load_file(str(runs["warm"] / name))
        assert set(cold) == set(warm)
        assert all(torch.equal(cold[k], warm[k]) for k in cold), name


def test_it_is_served_with_the_population_mean_mixture(local_runs):
    runs, calls = local_runs
    served = [(stage, mixture, out[ids.index("cold-q")]) for stage, mixture, ids, out in calls if "cold-q" in ids]
    # base, population, group, user: stage 3 serves it with the group-stage model, no user LoRA
    assert [s for s, _, _ in served] == ["base", "population", "group", "group"]
    assert served[0][1] is None and served[1][1] is None
    group_mix, user_mix = served[2][1], served[3][1]
    assert group_mix is not None and torch.equal(group_mix, user_mix)
    assert served[2][2] == served[3][2]      # the same prediction in stages 2 and 3
    assert torch.allclose(group_mix.sum(-1), torch.ones(len(group_mix)), atol=1e-5)
    # the mean of the trained users' mixtures: its layer average is the mean of their layer averages
    from shared.evaluation.groups import read_user_mixtures
    trained = read_user_mixtures(runs["cold"] / "client_state" / "mixtures.csv")
    assert COLD not in trained and len(trained) == 4
    want = torch.tensor([m["mixture"] for m in trained.values()]).mean(0)
    assert torch.allclose(group_mix.mean(0), want, atol=1e-5)
    # trained users are routed by their own e_u, never by the mean
    assert all(mixture is None for _, mixture, ids, _ in calls if "cold-q" not in ids)


def test_a_data_set_where_nobody_has_a_history_is_refused(proper, tmp_path):
    d = write_lamp(tmp_path / "data", [lamp_question("a", 0), lamp_question("b", 0)],
                   [{"id": "a", "output": "comedy"}, {"id": "b", "output": "action"}])
    out = proper("local", "-c", "tiny", f"output.dir={tmp_path / 'runs'}", f"data.path={d}")
    assert out.code == 2 and len(out.err) == 1
    assert out.err[0].startswith("error: ") and "every user's profile is empty" in out.err[0]


# ---------------------------------------------------------------- federated
def federated(tmp: Path, name: str, with_cold: bool, engine: str) -> Path:
    from sim.run import run_sim
    data = write_data(tmp / f"data-{name}", with_cold)
    assert run_sim("tiny", [f"output.dir={tmp}", f"output.name={name}", f"data.path={data}",
                            f"simulation.engine={engine}", "federation.server_lr=1.5",
                            "federation.audit_replies=true"]) == 0
    return tmp / name


def check_federated(run: Path, baseline: Path | None):
    """The run counted and evaluated the user with no history, every node answered every step, the
    node holding only that user trained nothing, and (baseline) the shared parts equal a run
    without it."""
    table = (run / "table.md").read_text()
    assert "users with no history: 1" in table and "failed" not in table
    rows = json.loads((run / "table.json").read_text())
    assert all(r["users"] == 5 and r["nodes"] == "5/5" for r in rows), rows
    assert "stage 1: population 4, stage 2: group 4, stage 3: user 4" in table
    replies = [json.loads(line) for f in (run / "wire").glob("*.jsonl") for line in f.read_text().splitlines()]
    trains = [r["metrics"]["metrics"] for r in replies if r["message_type"].startswith("train.")]
    assert sum(m["num-users"] == 0 for m in trains) == 3     # one per stage, the no-history node's
    assert all(m["num-examples"] == 0 for m in trains if m["num-users"] == 0)
    if baseline is not None:
        from server.checkpoint import Checkpoint
        _, parts = Checkpoint(run).load()
        _, base = Checkpoint(baseline).load()
        for part in ("population", "group"):
            assert all(torch.equal(parts[part][k], base[part][k]) for k in base[part]), part


def test_federated_inprocess_with_a_client_holding_only_a_user_with_no_history(tmp_path):
    check_federated(federated(tmp_path, "cold", True, "inprocess"),
                    federated(tmp_path, "warm", False, "inprocess"))


@pytest.mark.slow
def test_federated_on_ray_with_a_user_with_no_history(tmp_path):
    check_federated(federated(tmp_path, "cold", True, "ray"), None)
