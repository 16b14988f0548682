"""The deployed federation on localhost: a SuperLink and three SuperNodes as separate processes,
with TLS and SuperNode authentication, started through `proper server` / `proper client` and
driven by `proper submit`, exactly as docs/deployment.md tells a user.

Every process a test starts is stopped by the test, by its own pid (and the pids of what it
spawned), in a finally block. Deselect with `-m "not deployment"`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.fleet import Processes, family, wait_for
from client.deploy import split_lamp
from server.certs import make_certs
from shared.data.synthetic import write_synthetic_lamp
from tests.helpers import free_port

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

USERS, CLIENTS = 6, 3
TINY = ["data.task=LaMP_2", "federation.timeout_s=240"]


def online_nodes(root: Path, env: dict) -> int:
    res = subprocess.run(["flwr", "supernode", "ls", "proper", "--format", "json"], capture_output=True, text=True,
                         env={**env, "FLWR_HOME": str(root / "srv" / "flwr-home")}, cwd=root)
    try:
        nodes = json.loads(res.stdout[res.stdout.index("{"):]).get("nodes", [])
    except ValueError:
        return 0
    return sum(n.get("status") == "online" for n in nodes)


class Federation:
    def __init__(self, root: Path, procs: Processes, env: dict):
        self.root, self.procs, self.env = root, procs, env
        self.port = free_port()
        self.certs = root / "certs"
        make_certs(self.certs, nodes=CLIENTS + 1)  # node-4: a key the server never registers
        write_synthetic_lamp(root / "data" / "all", n_users=USERS, n_groups=2, seed=0, min_profile=4, max_profile=8)
        split_lamp(root / "data" / "all", CLIENTS, root / "data")

    def start_server(self):
        keys = [str(self.certs / f"node-{i}.pub") for i in range(1, CLIENTS + 1)]
        self.procs.start("server", "server", "--dir", "srv", "--host", "127.0.0.1", "--port", str(self.port),
                         "--certs", str(self.certs), "--node-keys", *keys)
        wait_for("the SuperLink", lambda: "SuperLink ready" in self.procs.log("server"), 120, every=0.5)

    def client_args(self, i: int, key: int | None = None, state: str | None = None) -> list[str]:
        return ["client", "--superlink", f"127.0.0.1:{self.port}", "--data", f"data/client-{i}",
                "--state", state or f"state-{i}", "--ca", str(self.certs / "ca.crt"),
                "--key", str(self.certs / f"node-{key or i}.key"), "--threads", "1"]

    def start_client(self, i: int):
        self.procs.start(f"client-{i}", *self.client_args(i))

    def wait_online(self, n: int, limit_s: float = 120):
        wait_for(f"{n} SuperNodes online", lambda: online_nodes(self.root, self.env) >= n, limit_s, every=2)

    def submit(self, run: str, *overrides: str, name: str | None = None) -> subprocess.Popen:
        return self.procs.start(name or f"submit-{run}", "submit", "--dir", "srv", "-c", "tiny",
                                "--run-dir", f"runs/{run}", *TINY, *overrides)

    def run_dir(self, run: str) -> Path:
        return self.root / "srv" / "runs" / run

    def progress(self, run: str) -> dict:
        path = self.run_dir(run) / "checkpoint" / "progress.json"
        return json.loads(path.read_text()) if path.exists() else {"done": [], "participation": {}, "seconds": {}}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                         os.environ.get("PYTHONPATH", "")])}
    procs = Processes(root, env)
    try:
        fed = Federation(root, procs, env)
        fed.start_server()
        for i in range(1, CLIENTS + 1):
            fed.start_client(i)
        fed.wait_online(CLIENTS)
        yield fed
    finally:
        procs.stop_all()


def test_three_stage_federation_over_tls_with_authentication(federation):
    fed = federation
    fed.submit("main", f"federation.min_available_clients={CLIENTS}")
    # meanwhile: a SuperNode whose key was never registered knocks, and is turned away
    fed.procs.start("rogue", *fed.client_args(1, key=CLIENTS + 1, state="state-rogue"),
                            "--rejoin-s", "0", "--max-retries", "2")
    assert fed.procs.finish("rogue", 120) != 0
    assert "Failed to activate SuperNode" in fed.procs.log("rogue")
    fed.procs.stop("rogue")
    assert fed.procs.finish("submit-main", 420) == 0, fed.procs.tails()
    fed.procs.stop("submit-main")

    run = fed.run_dir("main")
    rows = json.loads((run / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "population", "group", "user"]
    for r in rows:
        assert r["users"] == USERS and r["nodes"] == f"{CLIENTS}/{CLIENTS}", r
    table = (run / "table.md").read_text()
    for title in ("bare backbone", "stage 1: population", "stage 2: group", "stage 3: user"):
        assert title in table
    assert "| stage 3: user" in fed.procs.log("submit-main")  # the table came back through `flwr log`
    participation = fed.progress("main")["participation"]
    # 7 steps, and before group round 1 the query for the constraint loss's first pool of mixtures
    assert len(participation) == 8 and "group:1/pool" in participation
    for step, p in participation.items():
        assert p == {"sent": CLIENTS, "ok": CLIENTS, "failed": 0, "silent": 0, "users": USERS}, (step, p)
    # the private state stayed with each client, in a directory of this run; the server holds no data
    for i in range(1, CLIENTS + 1):
        state = fed.root / f"state-{i}" / "main"
        assert len(list(state.glob("*.embedding.safetensors"))) == USERS // CLIENTS
        assert len(list(state.glob("*.user/adapter_model.safetensors"))) == USERS // CLIENTS
    assert not list((fed.root / "srv").rglob("questions.json"))
    assert not list((fed.root / "srv").rglob("*.embedding.safetensors"))


def test_late_join_dropout_rejoin_and_server_restart_resume(federation):
    """Client 3 joins after the run started; client 2's SuperNode is killed in the middle of a
    round and its `proper client` brings it back; the server crashes after group:1 (injected),
    is restarted, and the run submitted again with the same run dir resumes from its checkpoint."""
    fed = federation
    fed.procs.stop("client-3")
    wait_for("client 3 offline", lambda: online_nodes(fed.root, fed.env) == CLIENTS - 1, 60, every=2)
    overrides = ["federation.min_available_clients=2", "federation.timeout_s=90", "population.rounds=2",
                 "eval.stages=[user]"]
    fed.submit("faults", *overrides, "debug.crash_after=group:1", name="submit-faults-1")

    def receiving(i: int) -> int:
        return fed.procs.log(f"client-{i}").count("Receiving: train.population message")

    before_1, before_2 = receiving(1), receiving(2)
    wait_for("population:1 under way", lambda: receiving(1) > before_1, 180)
    fed.start_client(3)  # late: the first round went out to two nodes
    wait_for("population:2 at client 2", lambda: receiving(2) >= before_2 + 2, 300)
    supernode = next(p for p in family(fed.procs.procs["client-2"].pid)
                     if "flower-supernode" in " ".join(p.cmdline()))
    kin = family(supernode.pid)
    supernode.kill()  # a crash in the middle of the round
    psutil.wait_procs(kin, timeout=15)
    assert fed.procs.finish("submit-faults-1", 420) == 1  # the injected crash: `proper submit` reports the failure
    fed.procs.stop("submit-faults-1")
    done = fed.progress("faults")
    assert done["done"] == ["population:1", "population:2", "group:1"]

    # restart the server (SuperLink + ServerApp): same directory, same database
    fed.procs.stop("server")
    fed.start_server()
    fed.wait_online(CLIENTS, limit_s=180)  # client 2 rejoined after its crash, all reconnected
    fed.submit("faults", *overrides, name="submit-faults-2")
    assert fed.procs.finish("submit-faults-2", 420) == 0, fed.procs.tails()
    fed.procs.stop("submit-faults-2")

    progress = fed.progress("faults")
    assert progress["done"] == ["population:1", "population:2", "group:1", "user", "eval:user"]
    for step in done["done"]:  # finished steps were not redone
        assert progress["seconds"][step] == done["seconds"][step]
        assert progress["participation"][step] == done["participation"][step]
    rounds = [json.loads(line) for line in (fed.run_dir("faults") / "rounds.jsonl").read_text().splitlines()]
    trained = [(r["stage"], r["round"]) for r in rounds if r["kind"] == "train"]
    assert trained == [("population", 1), ("population", 2), ("group", 1), ("user", 1)]
    p = progress["participation"]
    assert p["population:1"]["sent"] == 2 and p["population:1"]["ok"] == 2  # client 3 not there yet
    assert max(s["sent"] for s in p.values()) == CLIENTS                     # ... and then it was
    assert p["population:2"]["failed"] + p["population:2"]["silent"] == 1    # client 2 dropped out
    assert p["population:2"]["ok"] == p["population:2"]["sent"] - 1
    for step in ("user", "eval:user"):                                      # and came back
        assert p[step] == {"sent": CLIENTS, "ok": CLIENTS, "failed": 0, "silent": 0, "users": USERS}, (step, p[step])
    table = (fed.run_dir("faults") / "table.md").read_text()
    assert "population:2: " in table  # the table's notes name the step with a missing node
