"""Federated simulation wall time against `proper local` on the same work.

One invocation runs, on the same users, data and configuration, each as its own process
(`python -m sim.cli ...`, so each pays its own start-up and model load):

  local   `proper local`: one client holding every user, in one process
  sim-1   `proper sim` with every SuperNode holding one user (cross-device), Ray simulation
  sim-all `proper sim` with one SuperNode holding every user: the same computation as local
          (its results are identical), so its excess is the cost of Flower + Ray alone

in R interleaved repetitions ([local, sim-1, sim-all] x R; medians), and reports the ratios
sim / local (target <= 1.25), the peak memory of each process tree (Ray's processes included) and,
for the simulations, how much of the wall time the server's steps account for (the rest is Ray
and Flower start-up and shut-down).

    python -m bench.fed_vs_local --threads 1 --users 32        # tiny model, synthetic users
    python -m bench.fed_vs_local --threads 1 --model embedded  # SmolLM2 on the LaMP-2 sample

--threads 1 compares like for like (Ray gives each simulated client one thread; without it
`proper local` runs torch's default, which on a loaded machine can be slower, not faster).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PeakSampler, append_result, machine

TARGET = 1.25
ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    # tiny: synthetic users with the tiny config's training, more epochs so a step is not all overhead
    "tiny": ("tiny", ["population.epochs=4", "group.epochs=4", "user.epochs=4"]),
    # embedded: a few users of the real sample, one pass of each stage, test split only
    "embedded": ("lamp2_sample", ["data.max_users=6", "population.epochs=1", "group.rounds=1", "user.epochs=1",
                                  "eval.splits=[test]"]),
}
_DEFAULT_THREADS = "defaults (local: torch default; Ray actors: 1 each)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--users", type=int, default=8, help="synthetic users (tiny only)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variants", default="local,sim-1,sim-all")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every run (Ray gives each simulated client's actor 1 thread "
                         "unless this is set; `proper local` uses torch's default, all cores)")
    ap.add_argument("--keep", default=None, help="keep the run directories here")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/results/bench.md")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    return ap.parse_args(argv)


def run_one(kind: str, config: str, overrides: list[str], out: Path, name: str, threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "sim.cli", kind, "-c", config, *overrides,
           f"output.dir={out}", f"output.name={name}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
        with PeakSampler(proc.pid) as mem:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {rc}); see {out / (name + '.log')}")
    run = out / name
    steps = None
    progress = run / "checkpoint" / "progress.json"
    if progress.exists():
        steps = sum(json.loads(progress.read_text()).get("seconds", {}).values())
    rows = json.loads((run / "table.json").read_text())
    return {"wall": wall, "peak": mem.peak, "steps": steps, "metrics": [r["metrics"] for r in rows]}


def main(argv=None):
    args = parse_args(argv)
    config, preset = PRESETS[args.model]
    variants = args.variants.split(",")
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="fed_vs_local-"))
    tmp.mkdir(parents=True, exist_ok=True)
    overrides = [*preset, *args.overrides]
    n_users = None
    if args.model == "tiny":  # one synthetic data set for every run
        from shared.data.synthetic import write_synthetic_lamp
        data = write_synthetic_lamp(tmp / "data", n_users=args.users, n_groups=2, seed=0, min_profile=4, max_profile=8)
        overrides.append(f"data.path={data}")
        n_users = args.users
    else:
        from shared.runtime.config import load_config
        cfg = load_config(config, overrides)
        n_users = int(cfg.data.max_users or len(json.loads((Path(cfg.data.path) / "questions.json").read_text())))
    per = {"local": ("local", []), "sim-1": ("sim", ["federation.users_per_client=1"]),
           "sim-all": ("sim", [f"federation.users_per_client={n_users}"])}
    results = {v: [] for v in variants}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for v in variants:
            kind, extra = per[v]
            r = run_one(kind, config, [*overrides, *extra], tmp, f"{v}-{rep}", args.threads)
            results[v].append(r)
            print(f"rep {rep + 1}/{args.reps} {v}: {r['wall']:.1f} s wall, peak {r['peak'] / 2**20:.0f} MiB"
                  + (f", server steps {r['steps']:.1f} s" if r["steps"] is not None else ""), flush=True)
    wall = {v: statistics.median(r["wall"] for r in rs) for v, rs in results.items()}
    rows = ["| variant | wall s (median) | runs | peak RSS of the process tree | server steps s | vs local |",
            "|---|---:|---:|---:|---:|---:|"]
    for v, rs in results.items():
        steps = [r["steps"] for r in rs if r["steps"] is not None]
        walls = ", ".join("%.1f" % r["wall"] for r in rs)
        peak = max(r["peak"] for r in rs) / 2**20
        ratio = f"{wall[v] / wall['local']:.2f}" if "local" in wall else ""
        step_s = f"{statistics.median(steps):.1f}" if steps else ""
        rows.append(f"| {v} | {wall[v]:.1f} | {walls} | {peak:.0f} MiB | {step_s} | {ratio} |")
    same = ""
    if "local" in results and "sim-all" in results:
        same = ("identical" if results["local"][0]["metrics"] == results["sim-all"][0]["metrics"]
                else "DIFFERENT")
    verdict = ", ".join(f"{v}/local = {wall[v] / wall['local']:.2f} "
                        f"({'ok' if wall[v] / wall['local'] <= TARGET else 'ABOVE'} target {TARGET})"
                        for v in variants if v != "local" and "local" in wall)
    text = "\n".join([
        f"Work: `-c {config} {' '.join(shlex.quote(o) for o in overrides if not o.startswith('data.path='))}`"
        f" ({n_users} users{', synthetic' if args.model == 'tiny' else ''}); each variant a fresh process; "
        f"threads: {'OMP_NUM_THREADS=%d everywhere' % args.threads if args.threads else _DEFAULT_THREADS}.",
        f"Machine: {machine()}.",
        f"{args.reps} repetition(s) of [{', '.join(variants)}], {time.perf_counter() - t0:.0f} s in all.",
        "",
        *rows,
        "",
        f"Ratios of wall time: {verdict}." + (f" Metrics of local and sim-all: {same}." if same else ""),
        "server steps = the time the ServerApp's steps took (checkpoint/progress.json); wall - steps is "
        "Ray and Flower start-up and shut-down.",
    ])
    print()
    print(text)
    if not args.no_append:
        command = "python -m bench.fed_vs_local " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("appended to", append_result("b. federated simulation vs proper local", command, text))


if __name__ == "__main__":
    main()
