"""Broken and hostile clients in a whole run (in-process engine, tiny model): each malformed reply
kind is dropped by the server's checks with its node and reason, the run completes on the honest
replies, and a step left with too few valid replies stops the run at its last checkpoint."""
import json
import logging

import pytest

from sim.run import run_sim

HONEST = ["simulation.engine=inprocess", "data.synthetic.n_users=6", "eval.stages=[user]", "eval.splits=[test]"]


def run(tmp, name, *overrides):
    return run_sim("tiny", [f"output.dir={tmp}", f"output.name={name}", *HONEST, *overrides])


def trained(path):
    rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    return {(r["stage"], r["round"]): r for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("attack, bounds, reason", [
    ("nan", [], "non-finite values"),
    ("shape", [], "record 'arrays': key"),
    # no cap given: proper sim sets federation.max_examples from the data (the most items one client holds)
    ("claim_examples", [], "claims 1000000 examples, over the cap of"),
    ("scale", ["federation.norm_bound=10"], "over 10 x the step's median"),
])
def test_each_malformed_reply_is_dropped_and_the_run_completes(tmp_path, caplog, attack, bounds, reason):
    caplog.set_level(logging.WARNING, logger="proper.server")
    assert run(tmp_path, attack, "debug.attack_partitions=[2]", f"debug.attack={attack}", *bounds) == 0
    rounds = trained(tmp_path / attack)
    for stage in ("population", "group"):
        p = rounds[(stage, 1)]
        assert p["nodes_dropped"] == 1 and p["nodes_ok"] == 5 and p["nodes_sent"] == 6, p
    dropped = [r.getMessage() for r in caplog.records if "dropped the reply of node" in r.getMessage()]
    assert len(dropped) == 2 and all(reason in m for m in dropped), dropped
    from shared.runtime.config import read_config
    cap = read_config(tmp_path / attack / "config.yaml").federation.max_examples
    assert cap is not None and 4 <= cap <= 8   # tiny's synthetic users hold 4 to 8 items, one per client
    table = json.loads((tmp_path / attack / "table.json").read_text())
    assert table and all(v == v for r in table for v in r["metrics"].values())   # finite results


def test_an_honest_run_drops_nothing_and_records_its_update_norms(tmp_path):
    assert run(tmp_path, "honest", "federation.max_examples=50", "federation.norm_bound=10", "group.rounds=2") == 0
    rounds = trained(tmp_path / "honest")
    assert all("nodes_dropped" not in r for r in rounds.values())
    # without DP each shared round states its clients' update norms (a DP study's clip is chosen on them)
    r = rounds[("group", 2)]
    assert 0 < r["update_norm_p10"] <= r["update_norm_p50"] <= r["update_norm_p90"], r
    # plain FedAvg's first round sends no start (the clients draw it): no update to measure
    assert not {"update_norm_p50"} & (set(rounds[("population", 1)]) | set(rounds[("group", 1)]))
    assert "update_norm_p50" not in rounds[("user", 1)]   # stage 3 sends no parameters


def test_too_few_valid_replies_stop_the_run_at_its_last_checkpoint(tmp_path, caplog):
    from server.checkpoint import Checkpoint
    caplog.set_level(logging.ERROR, logger="proper.sim")
    assert run(tmp_path, "few", "debug.attack_partitions=[0,1]", "debug.attack=nan", "federation.min_replies=5") == 1
    stopped = [r.getMessage() for r in caplog.records if "the run stopped" in r.getMessage()]
    assert stopped and "population:1: 4 valid replies, fewer than federation.min_replies=5" in stopped[0]
    loaded = Checkpoint(tmp_path / "few").load()
    assert loaded is None or "population:1" not in loaded[0]["done"]


@pytest.fixture(scope="module")
def honest_parts(tmp_path_factory):
    from server.checkpoint import Checkpoint
    tmp = tmp_path_factory.mktemp("honest")
    assert run(tmp, "honest") == 0
    return Checkpoint(tmp / "honest").load()[1]


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean", "krum"])
def test_robust_aggregation_keeps_a_scaling_attacker_out(tmp_path, honest_parts, aggregation):
    """No reply is dropped (no norm bound): the robust aggregate itself keeps the x100 update out. With
    the mean the same attack moves the population LoRA by about 79 (its norm is about 4) and the group
    part by about 134 (its norm is about 6.5). The group part's median / trimmed mean clip every
    update to the median norm first (shared/method/robust.py): 0.08 / 0.05 from the honest mean run's
    (as far as the honest median run's is), where without the clip its first round had no start to
    clip against at all (plain FedAvg sends none: server/strategies needs_start)."""
    from server.checkpoint import Checkpoint
    assert run(tmp_path, aggregation, f"federation.aggregation={aggregation}", "debug.attack_partitions=[2]",
               "debug.attack=scale") == 0
    parts = Checkpoint(tmp_path / aggregation).load()[1]

    def moved(part):
        return sum(float((parts[part][k].float() - honest_parts[part][k].float()).norm() ** 2)
                   for k in parts[part]) ** 0.5
    assert moved("population") < 1.0, moved("population")
    if aggregation != "krum":   # Krum keeps one client's whole group part: a different honest reply
        assert moved("group") < 0.5, moved("group")   # 1.37 under median without the clip
