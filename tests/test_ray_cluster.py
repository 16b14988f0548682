"""`proper sim` against an existing Ray cluster (RAY_ADDRESS): a local head started with
`ray start --head`, a short simulation on it, then the head stopped; and a cluster of two nodes (a
head and a worker, two `ray start` processes with their own resources) whose clients must have run
on both.

`ray stop` would stop every Ray process on this machine (other users' simulations included), so
the test stops its own head by pid: the processes whose command line names its temp dir, and
what they spawned. Deselect with `-m "not ray_cluster"`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port

pytestmark = [pytest.mark.ray_cluster, pytest.mark.slow]

BIN = Path(sys.executable).parent


def head_processes(temp: Path) -> list[psutil.Process]:
    """The head's daemons (their command lines name its temp dir) and everything they spawned."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp) in arg for arg in (p.info["cmdline"] or [])):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_head(temp: Path):
    procs = head_processes(temp)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def ray_start(*args: str):
    env = {**os.environ, **RAY_ENV, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    res = subprocess.run([str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                          f"--dashboard-agent-listen-port={free_port()}", *args],
                         capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def ray_head():
    temp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's unix socket paths are limited
    port = free_port()
    try:
        ray_start("--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false",
                  f"--ray-client-server-port={free_port()}")
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_head(temp)
        assert not head_processes(temp), "the Ray head did not stop"
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_nodes():
    """A head and a worker node, each its own `ray start` (own raylet, temp dir, ports) with one CPU:
    a simulation's two one-CPU client actors can only be placed one on each."""
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rayh", "rayw")]
    port = free_port()
    try:
        ray_start("--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temps[0]}", "--include-dashboard=false",
                  f"--ray-client-server-port={free_port()}")
        ray_start(f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={temps[1]}",
                  f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                  f"--metrics-export-port={free_port()}")
        yield f"127.0.0.1:{port}", temps
    finally:
        for temp in reversed(temps):   # the worker first: a raylet whose head went away waits for it
            stop_head(temp)
        for temp in temps:
            assert not head_processes(temp), f"the Ray node in {temp} did not stop"
            shutil.rmtree(temp, ignore_errors=True)


def test_sim_on_an_existing_ray_cluster(ray_head, tmp_path):
    address, temp = ray_head
    env = {**os.environ, "RAY_ADDRESS": address, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
           "FLWR_HOME": str(tmp_path / "flwr-home")}
    res = subprocess.run([sys.executable, "-m", "sim.cli", "sim", "-c", "tiny", f"output.dir={tmp_path}",
                          "output.name=on-cluster"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"joining the Ray cluster at {address}" in out
    run = tmp_path / "on-cluster"
    rows = json.loads((run / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "population", "group", "user"]
    assert all(r["users"] == 4 and r["nodes"] == "4/4" for r in rows)
    # the job ran on this cluster: its driver and the ClientApp actors logged into the head's session
    logs = temp / "session_latest" / "logs"
    assert list(logs.glob("python-core-driver-*.log")), sorted(p.name for p in logs.iterdir())
    assert list(logs.glob("python-core-worker-*.log"))


def test_sim_on_a_two_node_ray_cluster(two_nodes, tmp_path):
    """`proper sim` against a cluster of two Ray nodes (separate `ray start` processes and resources on
    this machine): the clients ran on both, and the run is complete. Virtual clients, so that the
    two SuperNodes' actors serve six one-user clients."""
    address, temps = two_nodes
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": address, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
           "FLWR_HOME": str(tmp_path / "flwr-home")}
    res = subprocess.run([sys.executable, "-m", "sim.cli", "sim", "-c", "tiny", f"output.dir={tmp_path}",
                          "output.name=two-nodes", "data.synthetic.n_users=6", "simulation.virtual_clients=2",
                          "simulation.clients_per_message=1", "debug.record_nodes=true"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "'CPU': 2.0" in out   # the cluster the run saw: both nodes' CPUs
    run = tmp_path / "two-nodes"
    rows = json.loads((run / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "population", "group", "user"]
    assert all(r["users"] == 6 and r["nodes"] == "6/6" for r in rows)
    notes = [line.split() for f in (run / "ray_nodes").glob("*.txt") for line in f.read_text().splitlines()]
    nodes = {n for n, _ in notes}
    assert len(nodes) == 2 and "no-ray" not in nodes, notes
    assert {int(p) for _, p in notes} == set(range(6))
    for temp in temps:   # each node's raylet ran client workers: their logs are in its own session
        assert list((temp / "session_latest" / "logs").glob("python-core-worker-*.log")), temp
