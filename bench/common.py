"""What the benchmarks share: the machine's description, process-tree memory sampling, and
appending a result section to docs/results/bench.md."""
from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "docs" / "results" / "bench.md"


def run_logged(cmd: list[str], env: dict, log_path: Path) -> int:
    """A study's one run (`proper ...` in a child process, from the repository root), its output
    into log_path; returns the exit status (the studies' default `runner`)."""
    with open(log_path, "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def timing_args(description: str, argv=None) -> argparse.Namespace:
    """The micro-benchmarks' shared arguments: torch threads, repetitions, where to append the table."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray client has 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="append the table here (default: print only)")
    return ap.parse_args(argv)


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kb = int(next(line for line in lines if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        load = ", load average %.1f at start" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{os.cpu_count()} cores ({cpu}){mem}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}{load}")


def append_result(title: str, command: str, body: str, path: Path | str | None = None) -> Path:
    """Append one section to docs/results/bench.md (created with a heading if missing); a lock
    keeps two benchmarks finishing together from interleaving their sections."""
    path = Path(path) if path else BENCH_MD
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n## {title} ({stamp})\n\nCommand: `{command}`\n\n{body.strip()}\n"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if not f.read(1):
            f.write("# Benchmarks\n\nEach section: the command, the machine it ran on, the numbers, measured side "
                    "by side in one run. Newest last.\n")
        f.write(section)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return path


# ---------------------------------------------------------------- memory of a process tree
def _children(pid: int) -> list[int]:
    """All descendants of pid, from /proc (psutil when available)."""
    try:
        import psutil
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process ended
        return []
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of pid and all its descendants (Ray's GCS, raylet and workers included)."""
    return sum(rss_bytes(p) for p in [pid, *_children(pid)])


class PeakSampler:
    """Samples tree_rss(pid) every `interval` s in a thread; .peak is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out
