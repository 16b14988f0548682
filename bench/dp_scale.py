"""Privacy at the scale where it can work (issue 34, part 3): PROPER federated with client-level DP
on the population and group stages, Poisson client sampling accounted, on N = 100, 300, 1,000
synthetic users with known groups; stage 3 local (unnoised, never sent).

For each N and each privacy level (no DP; clipping alone; DP at target epsilon 8, 3, 1 with delta =
1 / N, composed over the run's population and group rounds) one `proper sim` run, then optionally
`proper audit` (canary exposure and membership AUC per released model). The noise multiplier z of a
target epsilon comes from the accountant the run itself uses (server/privacy.py `noise_for`: the
smallest z whose releases at q = m / N stay within it); the run's own {"kind": "privacy"} record
states the epsilon it spent, which the table prints beside the target.

    python -m bench.dp_scale --out /work/dp_scale --side dev --users 100 --levels none,8
    python -m bench.dp_scale --out /work/dp_scale --side report --users 100,300,1000 --audit
    python -m bench.dp_scale --out /work/dp_scale --side report --users 100 --audit-only --audit-candidates 63
    python -m bench.dp_scale --out /work/dp_scale --table-only

Cost is held in check the way the issue allows: the in-process engine with virtual clients, m
clients sampled per round (`--per-round`, q = m / N), and a fixed random sample of `--eval-users`
users evaluated and trained in stage 3 (eval.clients: the same users in every run of one N, whatever
the seed or the noise). Choosing on dev, reporting on another draw: the clip norm, the server's
step and the rounds are chosen on `--side dev` (draw seed 11) and reported on `--side report`
(draw seed 111); nothing is chosen on the report side.

Each run is a cell `<side>-N<users>--<level>--s<seed>` in <out>/runs, its log in <out>/logs, its
result (atomically, once it ends) in <out>/results/<cell>.json; a cell with a result is skipped,
so a killed study resumes. Outputs: <out>/dp_scale.md (one table per side and N), dp_scale.csv,
val_vs_epsilon.png (stage-3 val against the epsilon spent, one line per N; no DP at the right edge)
and exposure_vs_epsilon.png (where audited: per N the population LoRA, the user's own model and the
bare backbone); the figures draw the report side where it has run, else dev; a level run with
several seeds is one point (the mean) with min-max whiskers, and the table lists those bands.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import run_logged
from bench.suite import group_recovery
from shared.runtime.persist import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = "lamp2_sample"
DRAW_SEEDS = {"dev": 11, "report": 111}     # the report draw plays no part in choosing
STAGES = ("population", "group", "user")
# every run of the study: the in-process engine with virtual clients, one user per client, Poisson
# sampling (what the accountant amplifies; it refuses chains under DP), val and test evaluated
STUDY = ("simulation.engine=inprocess", "simulation.virtual_clients=2", "federation.chains=null",
         "federation.sampling=poisson", "eval.splits=[val,test]", "data.holdout=2")


def parse_levels(text: str) -> list[str]:
    """none (no DP), clip (clipping alone: z = 0, epsilon infinite), or a target epsilon."""
    out = []
    for x in (s.strip() for s in text.split(",") if s.strip()):
        if x not in ("none", "clip"):
            float(x)   # a target epsilon; ValueError names the bad one
        out.append(x)
    return out


def draw(out: Path, side: str, users: int, args) -> Path:
    """The side's synthetic users for N (`proper synth`, drawn once, atomically)."""
    d = out / "data" / f"{side}-N{users}"
    if not (d / "groups.json").is_file():
        from sim.cli import main as proper
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        argv = ["synth", "--out", str(tmp), "--users", str(users), "--groups", str(args.groups),
                "--seed", str(DRAW_SEEDS[side]), "--task", "LaMP_2", "--min-profile", str(args.min_profile),
                "--max-profile", str(args.max_profile)]
        with contextlib.redirect_stdout(io.StringIO()):
            if proper(argv) != 0:
                raise RuntimeError(f"proper synth failed: {' '.join(argv)}")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d


def per_round(users: int, args) -> int:
    return min(users, args.per_round)


def run_overrides(args, users: int, data: Path, level: str, seed: int, name: str) -> list[str]:
    """The run's overrides: the study's settings, then the privacy level's."""
    o = [f"seed={seed}", f"data.path={data}", "data.task=null", *STUDY,
         f"federation.clients_per_round={per_round(users, args)}", f"eval.clients={min(users, args.eval_users)}",
         f"privacy.canaries.users={args.canaries}", f"output.dir={args.out / 'runs'}", f"output.name={name}",
         *args.set]
    if level == "none":
        return o
    return o + [f"privacy.dp.clip={args.clip}", f"privacy.dp.noise_multiplier={noise(args, users, level)}"]


def noise(args, users: int, level: str) -> float:
    """z for the level: 0 for clipping alone, else the accountant's smallest z for the target epsilon
    over the run's population and group rounds at q = m / N and delta = 1 / N."""
    if level == "clip":
        return 0.0
    from server.privacy import noise_for
    from shared.runtime.config import load_config
    cfg = load_config(BASE_CONFIG, list(args.set))
    releases = int(cfg.population.rounds) + int(cfg.group.rounds)
    return round(noise_for(float(level), releases, per_round(users, args), users, 1.0 / users), 4)


DEFAULT_CLIP = 1.0


def cell_name(side: str, users: int, level: str, seed: int, clip: float = DEFAULT_CLIP) -> str:
    """`<side>-N<users>--<level>--s<seed>`; a clipped level with another clip norm than the default
    carries it (`--8-C6--`), so a study of clip norms keeps every run."""
    tag = level if level == "none" or clip == DEFAULT_CLIP else f"{level}-C{clip:g}"
    return f"{side}-N{users}--{tag}--s{seed}"


def read_result(run_dir: Path) -> dict:
    """Per stage and split the run's metrics (table.json), its privacy record, group recovery and audit."""
    out: dict = {"stages": {}, "privacy": None, "audit": None}
    if (run_dir / "table.json").is_file():
        for row in json.loads((run_dir / "table.json").read_text()):
            out["stages"].setdefault(row["stage"], {})[row["split"]] = {**row["metrics"], "users": row.get("users")}
    if (run_dir / "rounds.jsonl").is_file():
        for line in (run_dir / "rounds.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "privacy":
                out["privacy"] = {k: rec.get(k) for k in ("dp", "noise_multiplier", "clip", "delta", "epsilon",
                                                          "stages")}
    out["groups"] = group_recovery(run_dir)
    if (run_dir / "audit.json").is_file():
        a = json.loads((run_dir / "audit.json").read_text())
        out["audit"] = {v: {"exposure": r.get("exposure"), "membership_auc": r.get("membership_auc"),
                            "users": r.get("users")} for v, r in a["views"].items()}
    return out


def child_env(args) -> dict:
    """A run's or an audit's process: its torch threads, and no runtime installs (offline)."""
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def run_cell(args, side: str, users: int, level: str, seed: int, runner=None) -> dict:
    name = cell_name(side, users, level, seed, args.clip)
    result_path = args.out / "results" / f"{name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir = args.out / "runs" / name
    if run_dir.exists():   # cut off mid-run: start it again
        shutil.rmtree(run_dir)
    data = draw(args.out, side, users, args)
    o = run_overrides(args, users, data, level, seed, name)
    env = child_env(args)
    log_path = args.out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = runner or run_logged
    t0 = time.time()
    rc = run([sys.executable, "-m", "sim.cli", "sim", "-c", BASE_CONFIG, *o], env, log_path)
    wall = time.time() - t0
    audit_rc = audit_s = None
    if rc == 0 and args.audit:
        audit_rc, audit_s = audit_run(args, run_dir, env, log_path, run)
    res = {"name": name, "side": side, "users": users, "level": level, "seed": seed, "rc": rc,
           "per_round": per_round(users, args), "eval_users": min(users, args.eval_users),
           "clip": None if level == "none" else args.clip, "canaries": args.canaries, "wall_s": round(wall, 1),
           "audit_rc": audit_rc, "audit_s": audit_s,
           "command": "proper sim -c " + BASE_CONFIG + " " + " ".join(o), **read_result(run_dir)}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path, json.dumps(res, indent=1))
    print(f"{name}: rc {rc}, {res['wall_s']} s", flush=True)
    return res


def audit_run(args, run_dir: Path, env: dict, log_path: Path, run) -> tuple[int, float]:
    """`proper audit` on a finished run (its own log beside the run's): (exit status, seconds)."""
    cmd = [sys.executable, "-m", "sim.cli", "audit", str(run_dir)]
    if args.audit_candidates:
        cmd += ["--candidates", str(args.audit_candidates)]
    t1 = time.time()
    rc = run(cmd, env, log_path.with_suffix(".audit.log"))
    return rc, round(time.time() - t1, 1)


def audit_cell(args, side: str, users: int, level: str, seed: int, runner=None) -> dict | None:
    """--audit-only: audit a cell whose run has finished (its result written, its run directory kept)
    and put the audit into its result; a cell not run yet is left alone (None)."""
    name = cell_name(side, users, level, seed, args.clip)
    result_path = args.out / "results" / f"{name}.json"
    run_dir = args.out / "runs" / name
    if not result_path.is_file() or not run_dir.is_dir():
        print(f"{name}: not run yet, not audited", flush=True)
        return None
    res = json.loads(result_path.read_text())
    if "audit_rc" not in res and res["rc"] != 0 and res["stages"].get("user"):
        # written before the result kept the audit's status apart: rc was the audit's, and the run
        # itself finished (its table has the user stage)
        res["audit_rc"], res["rc"] = res["rc"], 0
    if res["rc"] != 0:
        print(f"{name}: the run failed (rc {res['rc']}), not audited", flush=True)
        return res
    env = child_env(args)
    res["audit_rc"], res["audit_s"] = audit_run(args, run_dir, env, args.out / "logs" / f"{name}.log",
                                                runner or run_logged)
    res["audit"] = read_result(run_dir)["audit"] if res["audit_rc"] == 0 else None
    atomic_write_text(result_path, json.dumps(res, indent=1))
    print(f"{name}: audit rc {res['audit_rc']}, {res['audit_s']} s", flush=True)
    return res


# ---------------------------------------------------------------- tables and figures
def _metric(res: dict, stage: str, split: str) -> float | None:
    m = res["stages"].get(stage, {}).get(split)
    return None if not m else 100 * float(m.get("accuracy", next(iter(m.values()))))


def _spent(res: dict) -> float | None:
    """The epsilon the run states it spent (composed), inf for clipping alone, None without DP."""
    p = res.get("privacy") or {}
    return float(p["epsilon"]) if p.get("dp") and p.get("epsilon") is not None else None


def _f(v, fmt="{:.1f}") -> str:
    if v is None:
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)


HEAD = ["level", "C", "seed", "z", "epsilon spent (delta)", "population val %", "group val %", "user val %",
        "user val - no DP", "user test %", "group ARI", "exposure base", "exposure population", "exposure user",
        "membership AUC population", "membership AUC user", "wall s"]


def rows(results: list[dict]) -> list[list[str]]:
    base = {r["seed"]: _metric(r, "user", "val") for r in results if r["level"] == "none" and r["rc"] == 0}
    out = []
    for r in results:
        p = r.get("privacy") or {}
        user = _metric(r, "user", "val")
        ref = base.get(r["seed"])
        audit = r.get("audit") or {}
        out.append([r["level"], _f(r.get("clip"), "{:g}"), str(r["seed"]),
                    _f(p.get("noise_multiplier"), "{:.3g}") if p.get("dp") else "-",
                    f"{_f(_spent(r), '{:.3g}')} ({_f(p.get('delta'), '{:.2g}')})" if p.get("dp") else "no DP",
                    *(_f(_metric(r, s, "val")) for s in STAGES),
                    _f(None if user is None or ref is None else user - ref, "{:+.1f}"),
                    _f(_metric(r, "user", "test")), _f((r.get("groups") or {}).get("ari"), "{:.2f}"),
                    *(_f(audit.get(v, {}).get("exposure"), "{:.2f}") for v in ("base", "population", "user")),
                    *(_f(audit.get(v, {}).get("membership_auc"), "{:.3f}") for v in ("population", "user")),
                    f"{r['wall_s']:.0f}" + (f" + {r['audit_s']:.0f} audit" if r.get("audit_s") else "")
                    + ("" if r["rc"] == 0 else f" (rc {r['rc']})")
                    + ("" if not r.get("audit_rc") else f" (audit rc {r['audit_rc']})")])
    return out


def band_lines(group: list[dict]) -> list[str]:
    """Where a level ran with several seeds: its stage-3 val as mean [min, max] over them (the band a
    DP level is read against), one line per level and clip norm."""
    levels: dict[tuple, list[float]] = {}
    for r in group:
        v = _metric(r, "user", "val")
        if r["rc"] == 0 and v is not None:
            levels.setdefault((r["level"], r.get("clip")), []).append((r["seed"], v))
    out = []
    for (level, clip), sv in sorted(levels.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1] or 0)):
        if len(sv) > 1:
            vs = [v for _, v in sv]
            out.append(f"- stage-3 val over seeds {', '.join(str(s) for s, _ in sorted(sv))}: {level}"
                       + (f" (C {clip:g})" if clip else "")
                       + f" {sum(vs) / len(vs):.1f} [{min(vs):.1f}, {max(vs):.1f}]")
    return out + [""] if out else []


def _order(level: str) -> tuple[int, float]:
    """No DP, clipping alone, then the targets from the weakest (largest epsilon) to the strongest."""
    return {"none": (0, 0.0), "clip": (1, 0.0)}.get(level) or (2, -float(level))


def write_outputs(out: Path, results: list[dict]) -> str:
    results = sorted(results, key=lambda r: (r["side"], r["users"], _order(r["level"]), r.get("clip") or 0,
                                             r["seed"]))
    md = ["# DP at scale (bench/dp_scale.py)", ""]
    with open(out / "dp_scale.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["side", "users", "per_round", "eval_users", *HEAD])
        for key in sorted({(r["side"], r["users"]) for r in results}):
            group = [r for r in results if (r["side"], r["users"]) == key]
            g0 = group[0]
            md += [f"## {key[0]}, N = {key[1]} ({g0['per_round']} clients a round on average, q = "
                   f"{g0['per_round'] / key[1]:.3g}; {g0['eval_users']} users evaluated)", "",
                   "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
            for row in rows(group):
                md.append("| " + " | ".join(row) + " |")
                w.writerow([key[0], key[1], g0["per_round"], g0["eval_users"], *row])
            md += [""] + band_lines(group)
    os.replace(out / "dp_scale.csv.tmp", out / "dp_scale.csv")
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "dp_scale.md", text)
    plot(out, results)
    return text


def plot(out: Path, results: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in results if r["rc"] == 0]
    # the figures draw one side: the report draw where it has run (the claims), else the dev draw
    side_drawn = "report" if any(r["side"] == "report" for r in done) else "dev"
    done = [r for r in done if r["side"] == side_drawn]
    spent = [_spent(r) for r in done if _spent(r) is not None and math.isfinite(_spent(r))]
    edge = max(spent) * 4 if spent else 16.0   # where no DP (and clipping alone) is drawn
    def exposure(view):
        return lambda r: ((r.get("audit") or {}).get(view) or {}).get("exposure")

    figures = (("val_vs_epsilon.png", [("", lambda r: _metric(r, "user", "val"))], "stage-3 val accuracy %"),
               # one line per N and released model: the population LoRA (every party holds it) and
               # the user's own stage-3 model (its client only); the backbone's is the reference
               ("exposure_vs_epsilon.png", [(", population LoRA", exposure("population")),
                                            (", user's own model", exposure("user")),
                                            (", bare backbone", exposure("base"))],
                "mean canary exposure (bits, rank estimate)"))
    for name, series, label in figures:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        # one line per N and clip norm; the no-DP run (no clip) is drawn on every line of its N
        clipped = {(r["side"], r["users"], r["clip"]) for r in done if r.get("clip")}
        alone = {(r["side"], r["users"], DEFAULT_CLIP) for r in done     # an N with no DP run: its own line
                 if not any(c[:2] == (r["side"], r["users"]) for c in clipped)}
        for (side, users, clip), (suffix, value) in ((k, v) for k in sorted(clipped | alone) for v in series):
            by_level: dict[str, list] = {}      # a level's seeds: one point, its mean, whiskers min-max
            for r in done:
                if (r["side"], r["users"]) != (side, users) or value(r) is None \
                        or (r.get("clip") or clip) != clip:
                    continue
                by_level.setdefault(r["level"], []).append(r)
            if not by_level:
                continue
            pts = []
            for runs in by_level.values():
                eps, ys = _spent(runs[0]), [value(r) for r in runs]
                x = edge if eps is None or not math.isfinite(eps) else sum(map(_spent, runs)) / len(runs)
                pts.append((x, sum(ys) / len(ys), min(ys), max(ys), eps is None))
            pts.sort()
            name_n = f"{side}, N = {users}" + ("" if clip == DEFAULT_CLIP else f", C = {clip:g}") + suffix
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                               yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker="o",
                               capsize=3, label=name_n, linestyle="--" if "backbone" in suffix else "-")[0]
            ax.scatter([p[0] for p in pts if p[4]], [p[1] for p in pts if p[4]], marker="*", s=160,
                       color=line.get_color(), zorder=3)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_xlabel(f"epsilon spent (delta = 1/N); no DP (star) and clipping alone at the right edge ({edge:.3g})")
        ax.set_ylabel(label)
        ax.set_title(f"{side_drawn} draw (seed {DRAW_SEEDS[side_drawn]}); whiskers: min-max over seeds", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def main(argv=None, runner=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dp_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--side", default="dev", choices=("dev", "report"))
    ap.add_argument("--users", default="100,300,1000")
    ap.add_argument("--levels", default="none,clip,8,3,1", type=parse_levels,
                    help="none (no DP), clip (clipping alone), or target epsilons")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--per-round", type=int, default=100, help="clients sampled per round on average (q = m / N)")
    ap.add_argument("--eval-users", type=int, default=100, help="users evaluated (and trained in stage 3)")
    ap.add_argument("--clip", type=float, default=DEFAULT_CLIP, help="C: each client's update clipped to this L2 norm")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--min-profile", type=int, default=4)
    ap.add_argument("--max-profile", type=int, default=12)
    ap.add_argument("--canaries", type=int, default=0, help="users given a canary (privacy.canaries.users)")
    ap.add_argument("--audit", action="store_true", help="run `proper audit` on each finished run")
    ap.add_argument("--audit-only", action="store_true",
                    help="run no study: audit the selected cells' finished runs and put the audits in their results")
    ap.add_argument("--audit-candidates", type=int, default=None,
                    help="candidates per canary in the audit (default: the runs' privacy.canaries.candidates, 255)")
    ap.add_argument("--set", action="append", default=[], help="one more override for every run (key=value)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        cells = [(args.side, int(n), lv, int(s)) for n in args.users.split(",") for lv in args.levels
                 for s in args.seeds.split(",")]
        for n in {c[1] for c in cells}:
            draw(args.out, args.side, n, args)
        each = audit_cell if args.audit_only else run_cell
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            list(pool.map(lambda c: each(args, *c, runner=runner), cells))
    results = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))] \
        if (args.out / "results").is_dir() else []
    print(write_outputs(args.out, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
