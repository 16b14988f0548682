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

Cross-device at scale (--virtual M --per-round K --short): M SuperNodes serve one virtual client
per user (simulation.virtual_clients), K clients sampled per round; --short runs the population
stage only (eval:base, population:1, eval:population). Then the targets are those of issue 16:
from 100 to 10,000 users the time per sampled client grows at most 1.5x, the peak memory at most
2x; and each evaluation step costs at most 1.5x the centralized evaluation of the same queries,
timed after the run in this process (one ClientTrainer holding every user, the run's final
parameters, warmed up first; column "eval sim / central").

    python -m bench.scale                       # 10, 100, 1000 users
    python -m bench.scale --users 10,100        # what fits in the time you have
    python -m bench.scale --users 10,100,1000,10000 --virtual 10 --per-round 100 --short
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
from shared.method.plan import Step

ROOT = Path(__file__).resolve().parent.parent
TRAIN_STEPS = ("population:1", "group:1", "user")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="10,100,1000")
    ap.add_argument("--profile", default="2,4", help="min,max profile items per synthetic user")
    ap.add_argument("--per-client", type=int, default=1,
                    help="users per SuperNode (federation.users_per_client); 1 = one SuperNode per user")
    ap.add_argument("--virtual", type=int, default=None,
                    help="M SuperNodes serving one virtual client per user (simulation.virtual_clients)")
    ap.add_argument("--per-round", type=int, default=None, help="clients sampled per round (clients_per_round)")
    ap.add_argument("--short", action="store_true", help="the population stage only: eval:base, population:1, "
                    "eval:population")
    ap.add_argument("--config", default="tiny", help="the run's config (tiny; e.g. lamp2_quick for the embedded model)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per user count")
    ap.add_argument("--keep", default=None, help="keep the run directories here")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/results/bench.md")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    return ap.parse_args(argv)


SHORT = ["method=population", "eval.stages=[base,population]"]


def setting(args) -> list[str]:
    """The overrides the options stand for."""
    out = [f"simulation.virtual_clients={args.virtual}"] if args.virtual else []
    out += [f"federation.clients_per_round={args.per_round}"] if args.per_round else []
    return out + (SHORT if args.short else [])


def run_scale(n: int, tmp: Path, profile: tuple[int, int], timeout: float, overrides: list[str],
              per_client: int = 1, config: str = "tiny") -> dict:
    from shared.data.synthetic import write_synthetic_lamp
    data = write_synthetic_lamp(tmp / f"data-{n}", n_users=n, n_groups=3, seed=0,
                                min_profile=profile[0], max_profile=profile[1])
    examples = sum(len(q["profile"]) for q in json.loads((data / "questions.json").read_text()))
    name = f"scale-{n}" + (f"-{per_client}pc" if per_client > 1 else "")
    cmd = [sys.executable, "-m", "sim.cli", "sim", "-c", config, f"data.path={data}",
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
    central = central_evaluation(tmp / name, seconds) if rc == 0 else {}
    return {"n": n, "examples": examples, "wall": wall, "peak": mem.peak, "samples": mem.samples,
            "seconds": seconds, "rc": rc, "timed_out": timed_out, "log": str(tmp / f"{name}.log"),
            "central": central}


def central_evaluation(run_dir: Path, seconds: dict) -> dict[str, float]:
    """Seconds the centralized evaluation of each evaluated stage takes: one trainer holding every
    user (each user's private state read from its client's directory), the run's final parameters,
    the same queries as the run's eval step. Warmed up first (the backbone loaded, one batch run)."""
    from client.virtual import batch_trainer
    from server.checkpoint import Checkpoint
    from shared.runtime.config import read_config
    cfg = read_config(run_dir / "config.yaml")
    n = int(cfg.simulation.get("num_clients") or cfg.federation.min_available_clients)
    loaded = Checkpoint(run_dir).load()
    parts = loaded[1] if loaded else {}
    trainer = batch_trainer(cfg, run_dir, {}, list(range(n)), n)
    first = trainer.users
    trainer.users = first[:4]
    trainer.evaluate("base", split=cfg.eval.splits[0])   # the warm-up
    trainer.users = first
    mean = parts.get("mixtures")
    out = {}
    for step in seconds:
        evaluated = Step.parse(step)
        if evaluated.kind != "eval":
            continue
        t0 = time.perf_counter()
        for split in cfg.eval.splits:
            trainer.evaluate(evaluated.arg, parts.get("population"), parts.get("group"), split=split,
                             mean_mixture=None if mean is None else mean.float().mean(0))
        out[step] = time.perf_counter() - t0
    return out


def _fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def report_sampled(results: list[dict], per_round: int) -> tuple[list[str], list[str]]:
    """Cross-device with sampling: a round's cost per sampled client, the evaluation against the
    centralized one, and the issue-16 targets from the second user count (100) up."""
    train_steps = [s for s in TRAIN_STEPS if any(s in r["seconds"] for r in results)]
    evals = [s for s in dict.fromkeys(s for r in results for s in r["seconds"]) if Step.parse(s).kind == "eval"]
    head = ["users", "sampled / round", "wall s", "peak RSS (tree)", *[f"{s} s" for s in train_steps],
            "s / sampled client", *[f"{s} s (sim / central)" for s in evals]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    per_client = {}
    for r in results:
        k = min(per_round, r["n"])
        train = [r["seconds"][s] for s in train_steps if s in r["seconds"]]
        per_client[r["n"]] = sum(train) / len(train) / k if train else None
        status = " (stopped at timeout)" if r["timed_out"] else ("" if r["rc"] == 0 else f" (rc {r['rc']})")
        ev = [f"{_fmt(r['seconds'].get(s))} / {_fmt(r['central'].get(s))} = "
              f"{_fmt(r['seconds'][s] / r['central'][s], 2) if r['central'].get(s) else ''}x" for s in evals]
        rows.append("| " + " | ".join([f"{r['n']}{status}", str(k), _fmt(r["wall"]), f"{r['peak'] / 2**20:.0f} MiB",
                                       *[_fmt(r["seconds"].get(s)) for s in train_steps],
                                       _fmt(per_client[r["n"]], 3), *ev]) + " |")
    notes = []
    base = next((r for r in results if r["n"] >= per_round), results[0])
    for r in results:
        if r["n"] <= base["n"] or per_client.get(r["n"]) is None or per_client.get(base["n"]) is None:
            continue
        t = per_client[r["n"]] / per_client[base["n"]]
        m = r["peak"] / base["peak"]
        notes.append(f"{r['n']} vs {base['n']} users, {per_round} sampled per round: time per sampled client "
                     f"{t:.2f}x ({'ok' if t <= 1.5 else 'ABOVE'} target 1.5x), peak memory {m:.2f}x "
                     f"({'ok' if m <= 2 else 'ABOVE'} target 2x)")
    for r in results:
        # the run's first step also starts the client actors (each loads the backbone): not evaluation
        first = next(iter(r["seconds"]), None)
        ratios = {s: r["seconds"][s] / c for s, c in r["central"].items() if s in r["seconds"] and c and s != first}
        if ratios:
            worst = max(ratios, key=ratios.get)
            notes.append(f"{r['n']} users: evaluation in simulation / centralized {ratios[worst]:.2f}x at worst "
                         f"({worst}; {'ok' if ratios[worst] <= 1.5 else 'ABOVE'} target 1.5x; {first} also "
                         "starts the client actors, which load the backbone)")
    return rows, notes


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
        r = run_scale(n, tmp, profile, args.timeout, [*setting(args), *args.overrides], args.per_client, args.config)
        results.append(r)
        print(f"{n} users: wall {r['wall']:.0f} s, peak {r['peak'] / 2**20:.0f} MiB, steps "
              + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())
              + (" (TIMED OUT)" if r["timed_out"] else ""), flush=True)
    rows, notes = report_sampled(results, args.per_round) if args.per_round else report(results)
    nodes = "one SuperNode per user" if args.per_client == 1 else f"{args.per_client} users per SuperNode"
    if args.virtual:
        nodes = f"{args.virtual} SuperNodes serving one virtual client per user"
    extra = [*setting(args), *args.overrides]
    text = "\n".join([
        f"Work: `proper sim -c {args.config}` with {nodes}, synthetic users with {profile[0]}-{profile[1]} "
        f"profile items{(' and ' + ' '.join(extra)) if extra else ''}; "
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
        title = f"c. scale: {args.users} simulated users ({args.config})" + (
            f", {args.per_client} users per SuperNode" if args.per_client > 1 else "") + (
            f", virtual clients on {args.virtual} SuperNodes, {args.per_round} sampled per round"
            if args.virtual else "")
        print("appended to", append_result(title, command, text))


if __name__ == "__main__":
    main()
