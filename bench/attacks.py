"""The attack study (docs/results/reliability.md, "The attack study"): hostile clients against the
server's reply checks and each `federation.aggregation`, on synthetic users with known groups.

    python -m bench.attacks --out attacks [--config lamp2_quick] [--users 10] [--only honest,10] ...

Generates the users once (shared/data/synthetic.py, what `proper synth` calls, with a cap on history
sizes the command line does not offer), then runs one `proper sim` per cell in its own process on the
in-process engine, one client per user, the same data and seed in every cell: the comparison is
paired, only the attack (debug.attack_partitions / debug.attack, client/hostile.py) and the
aggregation differ. Each cell's stage-3 val accuracy and macro F1 (table.json), the router ARI
against the data's groups.json (the `kind: groups` record of rounds.jsonl, shared/evaluation/groups.py),
the replies dropped (rounds.jsonl `nodes_dropped`), whether the run finished and its wall time go to
<out>/results/<cell>.json, written atomically once the run ends; a cell with a result is skipped, so
a killed sweep resumes where it was (a cell cut off mid-run starts again from scratch). The table:
<out>/attacks.md and attacks.json, each cell beside the honest run of its aggregation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import run_logged
from shared.runtime.persist import atomic_write_text

KINDS = ("nan", "scale", "sign_flip", "claim_examples")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum")
# the group-finding start of docs/results/groups.md (Sessions 13-17): signature start kept, k = groups
GROUP_FINDING = ["group.constraint_form=assign", "group.constraint_weight=1.0", "group.assign_start=signature",
                 "group.reassign=false"]


def attackers(users: int, fraction: float) -> list[int]:
    """The attacking partitions for a share of `users` clients (at least one for a share over 0):
    the first ones, so the 20 % cell's attackers include the 10 % cell's."""
    n = 0 if fraction <= 0 else max(1, round(users * fraction))
    return list(range(min(n, users)))


def cell_name(aggregation: str, kind: str | None, fraction: float) -> str:
    return f"{aggregation}-honest" if kind is None or fraction <= 0 else f"{aggregation}-{kind}-{round(fraction * 100)}"


def plan(aggregations=AGGREGATIONS, kinds=KINDS, fractions=(0.1, 0.2), second=("mean",)) -> list[dict]:
    """The cells in the order they are worth running: every aggregation's honest run, then each
    kind at the first share under every aggregation, then the further shares under `second` only."""
    cells = [{"aggregation": a, "kind": None, "fraction": 0.0} for a in aggregations]
    for i, f in enumerate(fractions):
        for k in kinds:
            for a in aggregations:
                if i == 0 or a in second:
                    cells.append({"aggregation": a, "kind": k, "fraction": f})
    for c in cells:
        c["name"] = cell_name(c["aggregation"], c["kind"], c["fraction"])
    return cells


def overrides(cell: dict, data: Path, runs: Path, users: int, args) -> list[str]:
    out = [f"data.path={data}", f"data.holdout={args.holdout}", "simulation.engine=inprocess",
           "federation.chains=null", "eval.splits=[val]", "eval.stages=[user]", f"seed={args.seed}",
           f"federation.aggregation={cell['aggregation']}", f"output.dir={runs}", f"output.name={cell['name']}"]
    if args.group_finding:
        out += GROUP_FINDING + [f"adapters.k={args.groups}"]
    if cell["kind"] is not None and cell["fraction"] > 0:
        out += [f"debug.attack={cell['kind']}", f"debug.attack_partitions={attackers(users, cell['fraction'])}"]
    return out + list(args.set)


def read_run(run_dir: Path) -> dict:
    """What a finished (or stopped) run directory says: stage-3 val, router ARI, replies dropped."""
    out: dict = {"val_accuracy": None, "val_macro_f1": None, "val_questions": None, "ari": None,
                 "purity": None, "dropped": 0, "population_loss": None, "group_loss": None}
    table = run_dir / "table.json"
    if table.is_file():
        for row in json.loads(table.read_text()):
            if row.get("stage") == "user" and row.get("split") == "val":
                out.update(val_accuracy=row["metrics"].get("accuracy"), val_macro_f1=row["metrics"].get("macro_f1"),
                           val_questions=row.get("examples"))
    rounds = run_dir / "rounds.jsonl"
    if rounds.is_file():
        for line in rounds.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "groups":
                out.update(ari=r.get("ari"), purity=r.get("purity"))
            elif r.get("kind") == "train":
                out["dropped"] += int(r.get("nodes_dropped", 0))
                if r.get("stage") in ("population", "group"):   # the training loss of the stage's last round
                    out[f"{r['stage']}_loss"] = r.get("train_loss")
    return out


def run_cell(cell: dict, out: Path, data: Path, users: int, args, runner=None) -> dict:
    """One cell, skipped where its result exists; `runner(cmd, env, log_path) -> rc` (tests)."""
    result_path = out / "results" / f"{cell['name']}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    runs = out / "runs"
    log_path = out / "logs" / f"{cell['name']}.log"
    done = _finished_log(log_path)
    if done is not None and (runs / cell["name"] / "table.json").is_file():   # ran to the end, its sweep did not
        return _record(cell, out, users, 0, done, "(adopted: the run finished after its sweep stopped)")
    if (runs / cell["name"]).exists():   # cut off mid-run: start it again
        shutil.rmtree(runs / cell["name"])
    cmd = [sys.executable, "-m", "sim.cli", "sim", "-c", args.config, *overrides(cell, data, runs, users, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rc = (runner or run_logged)(cmd, env, log_path)
    return _record(cell, out, users, rc, time.time() - t0, " ".join(cmd[2:]))


def _finished_log(log_path: Path) -> float | None:
    """The seconds of sim/run.py's closing "done in N s" line, None where the log has none."""
    if not log_path.is_file():
        return None
    m = re.findall(r"proper\.sim done in (\d+) s", log_path.read_text(errors="replace"))
    return float(m[-1]) if m else None


def _record(cell: dict, out: Path, users: int, rc: int, wall: float, command: str) -> dict:
    runs, result_path = out / "runs", out / "results" / f"{cell['name']}.json"
    res = {**cell, "attackers": attackers(users, cell["fraction"]) if cell["kind"] else [], "rc": rc,
           "finished": rc == 0 and (runs / cell["name"] / "table.json").is_file(),
           "wall_s": round(wall, 1), "command": command, **read_run(runs / cell["name"])}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path, json.dumps(res, indent=1))
    print(f"{cell['name']}: rc {rc}, val {res['val_accuracy']}, ARI {res['ari']}, {res['wall_s']} s", flush=True)
    return res


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _loss(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ari(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(results: list[dict], cells: list[dict]) -> tuple[str, list[dict]]:
    """Markdown and rows of every planned cell (not run: '-'), each beside its aggregation's honest run."""
    by_name = {r["name"]: r for r in results}
    rows = []
    for c in cells:
        r = by_name.get(c["name"])
        honest = by_name.get(cell_name(c["aggregation"], None, 0.0))
        delta = None
        if r and honest and r.get("val_accuracy") is not None and honest.get("val_accuracy") is not None:
            delta = r["val_accuracy"] - honest["val_accuracy"]
        rows.append({**c, "ran": r is not None, "finished": r["finished"] if r else None,
                     "val_accuracy": r.get("val_accuracy") if r else None, "ari": r.get("ari") if r else None,
                     "dropped": r.get("dropped") if r else None, "wall_s": r.get("wall_s") if r else None,
                     "group_loss": r.get("group_loss") if r else None,
                     "honest_val_accuracy": honest.get("val_accuracy") if honest else None,
                     "honest_ari": honest.get("ari") if honest else None, "val_delta": delta,
                     "val_questions": r.get("val_questions") if r else None})
    lines = ["| attack | share | aggregation | finished | stage-3 val | honest val | val - honest | router ARI | "
             "honest ARI | group loss | replies dropped | wall s |", "|---" * 12 + "|"]
    for row in rows:
        share = f"{round(row['fraction'] * 100)} %"
        if not row["ran"]:
            lines.append(f"| {row['kind'] or 'none'} | {share} | {row['aggregation']} | not run | | | | | | | | |")
            continue
        d = "-" if row["val_delta"] is None else f"{100 * row['val_delta']:+.1f}"
        done = "yes" if row["finished"] else "no"
        lines.append(f"| {row['kind'] or 'none'} | {share} | {row['aggregation']} | {done} | "
                     f"{_pct(row['val_accuracy'])} | {_pct(row['honest_val_accuracy'])} | {d} | {_ari(row['ari'])} | "
                     f"{_ari(row['honest_ari'])} | {_loss(row['group_loss'])} | {row['dropped']} | "
                     f"{row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n", rows


def write_table(out: Path, cells: list[dict]) -> tuple[str, list[dict]]:
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    for r in results:   # read again: a column added to read_run reaches cells recorded before it
        if (out / "runs" / r["name"]).is_dir():
            r.update(read_run(out / "runs" / r["name"]))
    md, rows = table(results, cells)
    atomic_write_text(out / "attacks.md", md)
    atomic_write_text(out / "attacks.json", json.dumps(rows, indent=1))
    return md, rows


def make_data(out: Path, args) -> Path:
    data = out / "data"
    if not (data / "groups.json").is_file():
        from shared.data.synthetic import write_synthetic_lamp
        write_synthetic_lamp(data, n_users=args.users, n_groups=args.groups, seed=args.seed,
                             min_profile=args.min_profile, max_profile=args.max_profile)
    return data


def main(argv=None, runner=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="lamp2_quick")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-profile", type=int, default=6)
    ap.add_argument("--max-profile", type=int, default=12)
    ap.add_argument("--holdout", type=int, default=3, help="val questions per user")
    ap.add_argument("--aggregations", default=",".join(AGGREGATIONS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--fractions", default="0.1,0.2")
    ap.add_argument("--second", default="mean", help="aggregations that run the shares after the first")
    ap.add_argument("--only", default="", help="comma-separated cell names to run (default: the whole plan, in order)")
    ap.add_argument("--no-group-finding", dest="group_finding", action="store_false",
                    help="leave out the signature-start overrides of docs/results/groups.md")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="one more override for every run")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]   # noqa: E731
    cells = plan(split(args.aggregations), split(args.kinds), [float(f) for f in split(args.fractions)],
                 split(args.second))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        data = make_data(args.out, args)
        by_name = {c["name"]: c for c in cells}
        todo = [by_name[n] for n in split(args.only) if n in by_name] if args.only else cells   # --only: its order
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            list(pool.map(lambda c: run_cell(c, args.out, data, args.users, args, runner), todo))
    md, _ = write_table(args.out, cells)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
