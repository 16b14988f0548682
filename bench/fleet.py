"""A deployed federation on this machine, as separate processes: `proper server` (SuperLink with
TLS and SuperNode authentication), N `proper client`s (one user each, data cut with
client/deploy.py split_lamp) and `proper submit`, exactly as docs/deployment.md tells a user.

Shared by bench/load.py (nodes joining and leaving under load) and tests/test_deployment_faults.py
(the SuperLink killed in the middle of a round). Every process is started in its own session and
stopped by its pid together with what it spawned; nothing is stopped by name.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate, limit_s: float, every: float = 1.0):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {limit_s:.0f} s waiting for {what}")


def deployment_env(root: Path) -> dict:
    """The environment of every process: a private Flower home, no runtime pip installs, this
    checkout and this Python first (Flower starts its own processes by name)."""
    return {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def family_rss(pid: int) -> int:
    total = 0
    for p in family(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Processes:
    """`proper ...` commands started as processes, each logging to <root>/<name>.log."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = Path(root), env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "sim.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 25) -> str:
        """The last lines of every process's log: what a failed deployment test prints, since the
        test's own temporary directory is gone by the time anyone reads a CI log."""
        out = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(t[:300] for t in text))
        return "\n".join(out)

    def finish(self, name: str, timeout: float) -> int:
        """The process's exit code; if it runs past `timeout`, an AssertionError carrying every log's tail."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f} s\n{self.tails()}") from None

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 30):
        """Signal the process, wait, then make sure everything it spawned is gone too."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        kin = family(proc.pid)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _, alive = psutil.wait_procs(kin[1:], timeout=15)  # Flower's processes watch their parent
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def kill_family(self, name: str) -> int:
        """SIGKILL the process and every descendant at once (a crash of the whole host's service);
        returns how many processes were killed."""
        proc = self.procs.pop(name)
        kin = family(proc.pid)
        for p in kin:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(kin, timeout=15)
        proc.wait()
        return len(kin)

    def stop_all(self):
        for name in reversed(list(self.procs)):
            self.stop(name)


class Fleet:
    """The server, N clients with one user's data each, and the runs submitted to them, all under
    one directory: certs/, data/client-<i>/, state-<i>/, srv/ (the server's --dir), <name>.log."""

    def __init__(self, root: Path, nodes: int, users: int | None = None, groups: int = 2, spare_keys: int = 0,
                 env: dict | None = None):
        from client.deploy import split_lamp
        from server.certs import make_certs
        from shared.data.synthetic import write_synthetic_lamp
        self.root, self.n, self.client_starts = Path(root), nodes, 0
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = env or deployment_env(self.root)
        self.procs = Processes(self.root, self.env)
        self.port = free_port()
        self.certs = self.root / "certs"
        make_certs(self.certs, nodes=nodes + spare_keys)  # spare keys: never registered
        write_synthetic_lamp(self.root / "data" / "all", n_users=users or nodes, n_groups=groups, seed=0,
                             min_profile=4, max_profile=8)
        split_lamp(self.root / "data" / "all", nodes, self.root / "data")

    # ---- the server
    def start_server(self, limit_s: float | None = None, state: str = "file"):
        """`proper server` with every client's key; waits until it says ready (each key is
        registered by a `flwr supernode register` process: seconds each on a busy machine)."""
        limit_s = limit_s or 120 + 10 * self.n
        keys = [str(self.certs / f"node-{i}.pub") for i in range(1, self.n + 1)]
        before = self.procs.log("server").count("SuperLink ready")
        self.procs.start("server", "server", "--dir", "srv", "--host", "127.0.0.1", "--port", str(self.port),
                         "--certs", str(self.certs), "--state", state, "--node-keys", *keys)
        wait_for("the SuperLink", lambda: self.procs.log("server").count("SuperLink ready") > before, limit_s,
                 every=0.5)

    def server_pid(self) -> int | None:
        proc = self.procs.procs.get("server")
        return proc.pid if proc is not None and proc.poll() is None else None

    # ---- the clients
    def client_args(self, i: int, key: int | None = None, state: str | None = None) -> list[str]:
        return ["client", "--superlink", f"127.0.0.1:{self.port}", "--data", f"data/client-{i}",
                "--state", state or f"state-{i}", "--ca", str(self.certs / "ca.crt"),
                "--key", str(self.certs / f"node-{key or i}.key"), "--threads", "1"]

    def start_client(self, i: int):
        self.procs.start(f"client-{i}", *self.client_args(i))
        self.client_starts += 1

    def stop_client(self, i: int):
        self.procs.stop(f"client-{i}")

    def client_pids(self) -> list[int]:
        return [p.pid for name, p in list(self.procs.procs.items()) if name.startswith("client-") and p.poll() is None]

    def received(self, i: int, message_type: str) -> int:
        """How many messages of this type client i's SuperNode has received (its log)."""
        return self.procs.log(f"client-{i}").count(f"Receiving: {message_type} message")

    def online(self) -> int:
        """SuperNodes the SuperLink counts online (`flwr supernode ls`); 0 when it does not answer."""
        res = subprocess.run(["flwr", "supernode", "ls", "proper", "--format", "json"], capture_output=True, text=True,
                             env={**self.env, "FLWR_HOME": str(self.root / "srv" / "flwr-home")}, cwd=self.root)
        try:
            nodes = json.loads(res.stdout[res.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            return 0
        return sum(n.get("status") == "online" for n in nodes)

    def wait_online(self, n: int, limit_s: float = 180):
        wait_for(f"{n} SuperNodes online", lambda: self.online() >= n, limit_s, every=2)

    # ---- runs
    def submit(self, run: str, *overrides: str, name: str | None = None, config: str = "tiny") -> subprocess.Popen:
        return self.procs.start(name or f"submit-{run}", "submit", "--dir", "srv", "-c", config,
                                "--run-dir", f"runs/{run}", *overrides)

    def run_dir(self, run: str) -> Path:
        return self.root / "srv" / "runs" / run

    def progress(self, run: str) -> dict:
        path = self.run_dir(run) / "checkpoint" / "progress.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet
            return {"done": [], "participation": {}, "seconds": {}}

    def rounds(self, run: str) -> list[dict]:
        path = self.run_dir(run) / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class MemoryPeaks:
    """Samples, every `interval` s in a thread, the resident memory of the server's process family
    and the sum over every client's family (psutil); keeps the peaks. A guard for a shared machine:
    when the memory available falls under `floor` bytes, every process of the fleet is killed at
    once (before the kernel's OOM killer picks a victim, maybe someone else's) and `.exhausted`
    says how low it went."""

    def __init__(self, fleet: Fleet, interval: float = 1.0, floor: int = 0):
        self.fleet, self.interval, self.floor = fleet, interval, floor
        self.exhausted: int | None = None
        self.server, self.clients, self.clients_per_node, self.samples = 0, 0, 0, 0
        # the whole machine: memory in use (total - available) at the start and at its highest;
        # it counts whatever else runs on the machine too, but also what RSS counts twice (shared pages)
        vm = psutil.virtual_memory()
        self.machine_start = self.machine_peak = vm.total - vm.available
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self):
        pid = self.fleet.server_pid()
        if pid is not None:
            self.server = max(self.server, family_rss(pid))
        per_node = [family_rss(p) for p in self.fleet.client_pids()]
        self.clients = max(self.clients, sum(per_node))
        self.clients_per_node = max([self.clients_per_node, *per_node])
        vm = psutil.virtual_memory()
        self.machine_peak = max(self.machine_peak, vm.total - vm.available)
        self.samples += 1
        if vm.available < self.floor and self.exhausted is None:
            self.exhausted = vm.available
            doomed = [p for proc in list(self.fleet.procs.procs.values()) for p in family(proc.pid)]
            for p in doomed:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
