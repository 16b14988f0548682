"""`proper report RUN [RUN ...] --out DIR`: one comparison of several runs, methods x metrics.

Reads what each run directory holds (config.yaml, table.json, table.md, rounds.jsonl, the clients'
state under client_state/ (proper local) or clients/*/ (proper sim), wire/*.jsonl, checkpoint/,
the exported artifacts) and writes into DIR:

  report.md    one table per evaluation split: every stage of every run, with the 95 % bootstrap
               CI over users of the headline metric, then the reference points
  report.csv   the same rows, one per (run, stage, split), for programs
  <metric>_<split>.png   the headline metric per row with its CI as error bars

Columns beyond the task metrics:
  stored/user  bytes of private state per user on its client: the files the client's UserStore
               keeps for that user (embedding, user LoRA + router, MTA retrieval + stacked LoRA),
               averaged over users
  sent/client/round  bytes a client uploads in one training round (array payload of its reply):
               the mean over every training reply in the run's wire audit (federation.audit_replies)
               and the largest one; without an audit, computed from the shapes of the shared
               parameters in the run's artifacts (marked "computed")
  wall         the run's wall time, from its table notes (else from its files' times)

Reference points, computed from the data of the first run on the same split as the runs: the most
frequent label of all users' training items answered everywhere, and each user's own most
frequent training label (ties: the label that comes first in the user's history); for the
LaMP-2 sample the numbers its SOURCE.md documents are listed too.

This module gathers the rows; sim/report_run.py reads one run directory, sim/report_refs.py
computes the reference rows and sim/report_write.py writes the markdown, CSV and figures.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from shared.runtime.persist import atomic_write_text
from shared.runtime.results import STAGE_TITLES
from sim.report_refs import documented_rows, majority_rows
from sim.report_run import Run
from sim.report_write import csv_rows, markdown_tables, plot_metric

BARE = ("base", "base-chat")   # the bare backbone's rows: the same in every run, listed once


# ---------------------------------------------------------------- the report
def build_report(run_paths: list[str], out: str | Path, labels: list[str] | None = None,
                 command: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(p, (labels or [None] * len(run_paths))[i]) for i, p in enumerate(run_paths)]
    from shared.data.lamp import task_spec
    spec = None
    for r in runs:
        task = OmegaConf.select(r.cfg, "data.task") or _task_of(r)
        if task:
            spec = task_spec(task)
            break
    metrics = spec.metrics if spec else sorted({m for r in runs for row in r.rows for m in row["metrics"]})
    head = metrics[0]
    splits = list(dict.fromkeys(row.get("split", "test") for r in runs for row in r.rows))

    rows, seen_base = [], {}
    for r in runs:
        wall = r.wall_seconds()
        for row in r.rows:
            stored, stored_kinds = r.stored_per_user(row["stage"])
            sent_mean, sent_max, source = r.sent_per_round(row["stage"])
            split = row.get("split", "test")
            bare = row["stage"] in BARE
            if bare:  # the bare backbone is the same in every run: list it once
                key = (row["stage"], split, json.dumps(row["metrics"], sort_keys=True))
                if key in seen_base:
                    continue
                seen_base[key] = r.label
            rows.append({"label": STAGE_TITLES[row["stage"]] if bare else
                         f"{r.label}: {STAGE_TITLES.get(row['stage'], row['stage'])}",
                         "method": r.method, "stage": row["stage"], "split": split, "run": str(r.path),
                         "metrics": row["metrics"], "ci": row.get("ci") or {}, "users": row.get("users"),
                         "examples": row.get("examples"),
                         "stored": None if bare else stored,
                         "stored_kinds": {} if bare else stored_kinds,
                         "sent_mean": None if bare else sent_mean,
                         "sent_max": None if bare else sent_max,
                         "sent_source": "" if bare else source,
                         "wall": None if bare else wall})
    refs = []
    if runs and "path" in (runs[0].cfg.get("data") or {}):
        try:
            refs = majority_rows(runs[0].cfg, splits) + documented_rows(runs[0].cfg, splits, head)
        except (OSError, ValueError) as e:  # the data moved or is unreadable: report without them
            print(f"proper report: no majority baselines ({e})", file=sys.stderr)
    for ref in refs:
        rows.append({**ref, "method": "reference", "run": "", "ci": ref.get("ci") or {}, "stored": None,
                     "stored_kinds": {}, "sent_mean": None, "sent_max": None, "sent_source": "", "wall": None})

    md = markdown_tables(rows, metrics, splits, runs, command)
    if refs:
        d = runs[0].cfg.data
        md += (f"- reference rows computed from the data of `{runs[0].path}`: {d.path}, holdout "
               f"{d.get('holdout') or 0}\n")
        data_keys = {json.dumps({k: str(r.cfg.data.get(k)) for k in ("path", "holdout", "max_users", "longest")})
                     for r in runs if r.cfg.get("data")}
        if len(data_keys) > 1:
            md += "- WARNING: the runs do not all use the same users and splits (data.* differs); compare with care\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", csv_rows(rows, metrics))
    for split in splits:
        plot_metric(rows, head, split, out / f"{head}_{split}.png")
    return out / "report.md"


def _task_of(run: Run) -> str | None:
    md = run.path / "table.md"
    m = re.search(r"task (LaMP_\w+)", md.read_text()) if md.exists() else None
    return m.group(1) if m else None


def main(args) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)  # as sim/cli.py words errors
        return 2
    command = args.command or "proper report " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    path = build_report(args.runs, args.out, labels, command)
    print(path.read_text())
    return 0
