"""Scale of the federated simulation: the tiny model with 10, 100 and 1000 simulated users.

For each user count N, one `proper sim -c tiny` process (one SuperNode per user, synthetic users
with small histories) runs PROPER's whole plan; the benchmark records

  time per round  each step of the server's plan (checkpoint/progress.json: training rounds of
                  stages 1, 2, 3 and the evaluations), and per user
  peak memory     the largest resident memory of the whole process tree (the simulation process,
                  Ray's GCS, raylet and worker processes), sampled every 0.25 s (psutil, else /proc)

Targets: time per round linear in the number of users; peak memory at 1000 users <= 2x that at 10.
A run that passes --timeout is stopped; the steps it finished are still reported (the server
checkpoints after every step) and anything extrapolated is labelled so.

    python -m bench.scale                       # 10, 100, 1000 users
    python -m bench.scale --users 10,100        # what fits in the time you have
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PeakSampler, append_result, machine

ROOT = Path(__file__).resolve().parent.parent
TRAIN_STEPS = ("population:1", "group:1", "user")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="10,100,1000")
    ap.add_argument("--profile", default="2,4", help="min,max profile items per synthetic user")
    ap.add_argument("--per-client", type=int, default=1,
                    help="users per SuperNode (federation.users_per_client); 1 = one SuperNode per user")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per user count")
    ap.add_argument("--keep", default=None, help="keep the run directories here")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/results/bench.md")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    return ap.parse_args(argv)


def run_scale(n: int, tmp: Path, profile: tuple[int, int], timeout: float, overrides: list[str],
              per_client: int = 1) -> dict:
    from shared.data.synthetic import write_synthetic_lamp
    data = write_synthetic_lamp(tmp / f"data-{n}", n_users=n, n_groups=3, seed=0,
                                min_profile=profile[0], max_profile=profile[1])
    examples = sum(len(q["profile"]) for q in json.loads((data / "questions.json").read_text()))
    name = f"scale-{n}" + (f"-{per_client}pc" if per_client > 1 else "")
    cmd = [sys.executable, "-m", "sim.cli", "sim", "-c", "tiny", f"data.path={data}",
           f"federation.users_per_client={per_client}", f"output.dir={tmp}", f"output.name={name}", *overrides]
    t0 = time.perf_counter()
    timed_out = False
    with open(tmp / f"{name}.log", "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        with PeakSampler(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the sim and its Ray processes
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    wall = time.perf_counter() - t0
    progress = tmp / name / "checkpoint" / "progress.json"
    seconds = json.loads(progress.read_text()).get("seconds", {}) if progress.exists() else {}
    return {"n": n, "examples": examples, "wall": wall, "peak": mem.peak, "samples": mem.samples,
            "seconds": seconds, "rc": rc, "timed_out": timed_out, "log": str(tmp / f"{name}.log")}


def _fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def report(results: list[dict]) -> tuple[list[str], list[str]]:
    steps = []
    for r in results:
        steps += [s for s in r["seconds"] if s not in steps]
    head = ["users", "profile items", "wall s", "peak RSS (tree)", *steps, "train round s / user"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    base = results[0]
    for r in results:
        train = [r["seconds"][s] for s in TRAIN_STEPS if s in r["seconds"]]
        per_user = sum(train) / len(train) / r["n"] if train else None
        status = " (stopped at timeout)" if r["timed_out"] else ("" if r["rc"] == 0 else f" (rc {r['rc']})")
        rows.append("| " + " | ".join([f"{r['n']}{status}", str(r["examples"]), _fmt(r["wall"]),
                                       f"{r['peak'] / 2**20:.0f} MiB",
                                       *[_fmt(r["seconds"].get(s)) for s in steps], _fmt(per_user, 3)]) + " |")
    notes = []
    for r in results[1:]:
        k = r["n"] / base["n"]
        common = [s for s in TRAIN_STEPS if s in r["seconds"] and s in base["seconds"]]
        if common:
            t = sum(r["seconds"][s] for s in common) / sum(base["seconds"][s] for s in common)
            verdict = "linear or better" if t <= 1.15 * k else "WORSE than linear"
            notes.append(f"{r['n']} vs {base['n']} users ({k:.0f}x): training rounds took {t:.1f}x "
                         f"({verdict}; measured on {', '.join(common)})")
        m = r["peak"] / base["peak"] if base["peak"] else float("nan")
        notes.append(f"peak memory {r['n']} vs {base['n']} users: {m:.2f}x "
                     f"({'ok' if m <= 2 else 'ABOVE'} target 2x{'' if not r['timed_out'] else ', up to the timeout'})")
    for r in results:
        missing = [s for s in TRAIN_STEPS if s not in r["seconds"]]
        if r["timed_out"] and missing and len(results) > 1:
            prev = [p for p in results if p is not r and all(s in p["seconds"] for s in missing)]
            if prev:
                p = max(prev, key=lambda p: p["n"])
                est = {s: p["seconds"][s] * r["n"] / p["n"] for s in missing}
                notes.append(f"EXTRAPOLATED, not measured: {r['n']} users would need about "
                             + ", ".join(f"{s} {v:.0f} s" for s, v in est.items())
                             + f" (linear from {p['n']} users)")
    return rows, notes


def main(argv=None):
    args = parse_args(argv)
    counts = [int(x) for x in args.users.split(",")]
    profile = tuple(int(x) for x in args.profile.split(","))
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for n in counts:
        r = run_scale(n, tmp, profile, args.timeout, list(args.overrides), args.per_client)
        results.append(r)
        print(f"{n} users: wall {r['wall']:.0f} s, peak {r['peak'] / 2**20:.0f} MiB, steps "
              + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())
              + (" (TIMED OUT)" if r["timed_out"] else ""), flush=True)
    rows, notes = report(results)
    nodes = "one SuperNode per user" if args.per_client == 1 else f"{args.per_client} users per SuperNode"
    text = "\n".join([
        f"Work: `proper sim -c tiny` with {nodes}, synthetic users with {profile[0]}-{profile[1]} "
        f"profile items{(' and ' + ' '.join(args.overrides)) if args.overrides else ''}; "
        "each user count a fresh process.",
        f"Machine: {machine()}.",
        f"{time.perf_counter() - t0:.0f} s in all. Step columns: seconds of each server step "
        "(checkpoint/progress.json); wall includes Ray and Flower start-up.",
        "",
        *rows,
        "",
        *[f"- {n}" for n in notes],
    ])
    print()
    print(text)
    if not args.no_append:
        command = "python -m bench.scale " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        title = "c. scale: 10, 100, 1000 simulated users (tiny model)" + (
            f", {args.per_client} users per SuperNode" if args.per_client > 1 else "")
        print("appended to", append_result(title, command, text))


if __name__ == "__main__":
    main()
