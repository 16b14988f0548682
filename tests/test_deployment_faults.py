"""Faults of a real deployment on this machine: `proper server`, `proper client`s and `proper submit`
as separate processes over TLS with SuperNode authentication (bench/fleet.py starts them as
docs/deployment.md tells a user).

- The SuperLink's whole process family is killed (SIGKILL) in the middle of a round; `proper submit`
  ends with an error naming the way back; the server is started again on the same directory, the
  clients reconnect on their own, the run is submitted again with the same run dir and resumes
  from its checkpoint (docs/deployment.md, "Faults").
- bench/load.py at a small size: nodes joining and leaving during a run (docs/results/reliability.md).

Every process a test starts is stopped by its pid with what it spawned. Deselect with
`-m "not deployment"`.
"""
from __future__ import annotations

import json

import pytest

from bench.fleet import Fleet, wait_for

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

CLIENTS, USERS = 3, 6
STEPS = ["eval:base", "population:1", "population:2", "eval:population", "group:1", "eval:group", "user",
         "eval:user"]


def test_superlink_killed_mid_round_restarted_and_resubmitted_resumes(tmp_path):
    fleet = Fleet(tmp_path, CLIENTS, users=USERS)
    overrides = ["data.task=LaMP_2", f"federation.min_available_clients={CLIENTS}", "federation.timeout_s=240",
                 "population.rounds=2"]
    try:
        fleet.start_server()
        for i in range(1, CLIENTS + 1):
            fleet.start_client(i)
        fleet.wait_online(CLIENTS)
        fleet.submit("crash", *overrides, name="submit-1")
        # population:2 has reached every client: the round is in flight
        wait_for("population:2 at every client",
                 lambda: all(fleet.received(i, "train.population") >= 2 for i in range(1, CLIENTS + 1)), 420)
        before = fleet.progress("crash")
        assert before["done"] == STEPS[:2], before["done"]
        assert fleet.procs.kill_family("server") >= 3  # proper server, flower-superlink, the ServerApp's processes

        # `proper submit` sees the SuperLink die: a clear error naming the way back, a non-zero exit
        assert fleet.procs.finish("submit-1", 180) == 1
        said = fleet.procs.log("submit-1")
        assert "lost the SuperLink" in said and "--run-dir runs/crash to resume" in said, said[-2000:]
        fleet.procs.stop("submit-1")
        assert fleet.progress("crash") == before  # the interrupted round left no trace in the checkpoint

        fleet.start_server()
        fleet.wait_online(CLIENTS, limit_s=240)   # the clients came back by themselves
        fleet.submit("crash", *overrides, name="submit-2")
        assert fleet.procs.finish("submit-2", 600) == 0, fleet.procs.tails()
        fleet.procs.stop("submit-2")
    finally:
        fleet.procs.stop_all()

    progress = fleet.progress("crash")
    assert progress["done"] == STEPS
    for step in before["done"]:  # finished steps were not redone
        assert progress["seconds"][step] == before["seconds"][step]
        assert progress["participation"][step] == before["participation"][step]
    for step, p in progress["participation"].items():  # the interrupted round was redone, by every node
        assert p == {"sent": CLIENTS, "ok": CLIENTS, "failed": 0, "silent": 0, "users": USERS}, (step, p)
    for i in range(1, CLIENTS + 1):  # population:1, the interrupted population:2, and population:2 again
        assert fleet.received(i, "train.population") == 3
    trained = [(r["stage"], r["round"]) for r in fleet.rounds("crash") if r["kind"] == "train"]
    assert trained == [("population", 1), ("population", 2), ("group", 1), ("user", 1)]
    rows = json.loads((fleet.run_dir("crash") / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "population", "group", "user"]
    for r in rows:
        assert r["users"] == USERS and r["nodes"] == f"{CLIENTS}/{CLIENTS}", r
    assert "| stage 3: user" in (fleet.run_dir("crash") / "table.md").read_text()


def test_load_nodes_joining_and_leaving(tmp_path):
    """bench/load.py with 8 nodes: 6 at first, 2 join during population:1, 1 leaves during
    population:2 and comes back; the run completes and its table adds up. With the SuperLink's
    state in memory (`proper server --state memory`, what many nodes on few cores need; the file
    state is what the other deployment tests run on)."""
    from bench.load import main
    nodes = 8
    assert main(["--nodes", str(nodes), "--out", str(tmp_path / "load"), "--population-rounds", "2",
                 "--group-rounds", "1", "--look-every", "15", "--state", "memory"]) == 0
    s = json.loads((tmp_path / "load" / "load.json").read_text())
    assert (tmp_path / "load" / "load.md").read_text().startswith("Load test: 8 SuperNodes")
    assert s["state"] == "memory" and "state in memory" in (tmp_path / "load" / "load.md").read_text()
    started = [line for line in (tmp_path / "load" / "server.log").read_text().splitlines()
               if "starting: flower-superlink" in line]
    assert started and "--database" not in started[0]
    assert not (tmp_path / "load" / "srv" / "state.db").exists()
    p = s["plan"]
    assert (p["initial"], p["late"], p["stop"], p["back"]) == (6, 2, 1, 1)
    assert s["completed"] and s["submit_rc"] == 0
    assert s["nodes_started"] == nodes and s["client_starts"] == nodes + p["back"]
    assert p["initial"] <= s["online_max"] <= nodes
    steps = {st["step"]: st for st in s["steps"]}
    assert list(steps) == ["population:1", "population:2", "group:1", "user", "eval:user"]
    assert s["train_rounds_logged"] == 4
    assert steps["population:1"]["sent"] >= p["initial"]
    # the stopped node failed (or stayed silent) in population:2, every other node answered
    pop2 = steps["population:2"]
    assert pop2["sent"] == nodes and pop2["failed"] + pop2["silent"] >= p["stop"]
    for st in steps.values():
        assert st["ok"] + st["failed"] + st["silent"] == st["sent"] <= nodes, st
        assert st["users"] == st["ok"], st  # one user per node
        assert st["seconds"] > 0
    # on a busy machine a SuperNode may miss its heartbeat and lose a reply (docs/results/reliability.md)
    assert steps["eval:user"]["ok"] >= nodes // 2
    assert s["run_seconds"] <= s["wall_s"]
    assert 0 < s["peak_server_mib"] and 0 < s["peak_client_node_mib"] <= s["peak_clients_mib"]
    assert s["table"] and s["table"][-1]["stage"] == "user"
