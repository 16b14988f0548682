"""The suite's tables and figure (bench/suite.py): from <out>/results/*.json, one table per data set,
its rows the stages of each method, each value the mean and [min, max] over the run seeds that
finished; <out>/suite.md, <out>/suite.csv (one row per data set, method, stage, split and metric),
<out>/suite.png (each data set's final-stage metric per method, val where the data set has it)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from shared.data.tasks import task_spec
from shared.runtime.persist import atomic_write_text

RAW = ("mae", "rmse")          # metrics shown as they are (lower is better); the others as percentages
LOOKUP_NOTE = ("reference rows (sim/report_refs.py, no model): the most frequent training label, each user's own "
               "most frequent one, and a lookup that READS OTHER USERS' LABELS (another user's label for the "
               "same input): not a personalization method, a measure of how much of the data set is "
               "answered by remembering other users' items")


def load_results(out: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    cells, refs = [], {}
    for p in sorted((out / "results").glob("*.json")):
        if p.name.endswith("--reference.json"):
            refs[p.name[: -len("--reference.json")]] = json.loads(p.read_text())
        else:
            cells.append(json.loads(p.read_text()))
    return cells, refs


def _band(values: list[float]) -> tuple[float, float, float] | None:
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(min(v)), float(max(v))) if v else None


def _fmt(metric: str, b) -> str:
    if b is None:
        return "-"
    scale, digits = (1, 3) if metric in RAW else (100, 1)
    mean, lo, hi = (x * scale for x in b)
    return f"{mean:.{digits}f}" if lo == hi else f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summarise(ds, results: list[dict]) -> list[dict]:
    """Rows of one data set: the bare backbone once, then each method's trained stages."""
    from bench.suite import METHODS
    metrics = task_spec(ds.task).metrics
    rows, base_done = [], False
    for m in METHODS:
        runs = [r for r in results if r["method"] == m and r.get("finished")]
        if not runs:
            continue
        stages = list(dict.fromkeys(s for r in runs for s in r["stages"]))
        for stage in stages:
            if stage == "base":
                if base_done:
                    continue
                base_done = True
            row = {"dataset": ds.name, "side": ds.side, "task": ds.task, "method": "bare backbone" if stage == "base"
                   else m, "stage": stage, "final": stage == METHODS[m].final, "seeds": len(runs), "values": {}}
            for split in ds.splits:
                for metric in metrics:
                    row["values"][(split, metric)] = _band(
                        [r["stages"].get(stage, {}).get(split, {}).get(metric) for r in runs])
            comp = [r.get("compute") or {} for r in runs]
            row["passes"] = _band([c.get("total_passes") for c in comp]) if stage != "base" else None
            row["examples_seen"] = _band([c.get("examples_seen") for c in comp]) if stage != "base" else None
            row["wall_s"] = _band([r["wall_s"] for r in runs]) if stage != "base" else None
            row["ari"] = _band([(r.get("groups") or {}).get("ari") for r in runs]) if stage == "group" else None
            rows.append(row)
    return rows


def _table(ds, rows: list[dict], refs: list[dict], planned: int, finished: int, failed: int) -> str:
    metrics = task_spec(ds.task).metrics
    cols = [(sp, m) for sp in ds.splits for m in metrics]
    unit = lambda m: m if m in RAW else f"{m} %"   # noqa: E731
    head = ["method", "stage", "seeds", *(f"{sp} {unit(m)}" for sp, m in cols), "group ARI", "passes",
            "examples seen", "wall s"]
    lines = [f"### {ds.name} ({ds.side}; {ds.task}; {finished} of {planned} cells finished, {failed} failed)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if not rows and not refs:
        return "\n".join(lines[:2]) + "\nNo cell has run.\n"
    for r in rows:
        stage = f"**{r['stage']}**" if r["final"] else r["stage"]
        num = lambda b, d=0: "-" if b is None else (f"{b[0]:.{d}f}" if b[1] == b[2] else   # noqa: E731
                                                    f"{b[0]:.{d}f} [{b[1]:.{d}f}, {b[2]:.{d}f}]")
        lines.append("| " + " | ".join([r["method"], stage, str(r["seeds"]),
                                        *(_fmt(m, r["values"].get((sp, m))) for sp, m in cols),
                                        num(r.get("ari"), 3), num(r["passes"], 2), num(r["examples_seen"]),
                                        num(r["wall_s"])]) + " |")
    by_label: dict[str, dict] = {}   # one row per reference, its splits side by side
    for ref in refs:
        if ref.get("split") in ds.splits:
            by_label.setdefault(ref["label"], {}).update({(ref["split"], m): v for m, v in ref["metrics"].items()})
    for label, vals in by_label.items():
        cells = [_fmt(m, (vals[(sp, m)],) * 3) if (sp, m) in vals else "-" for sp, m in cols]
        lines.append("| " + " | ".join(["reference", label, "-", *cells, "-", "-", "-", "-"]) + " |")
    return "\n".join(lines) + "\n"


BASELINES = ("population", "oppu", "rag")   # issue 33: stage 3 at or above the best of these on val


def bars(ds, rows: list[dict]) -> list[str] | None:
    """One data set's line of the issue's bars, read off its summarised rows (the default, proper-fed,
    against the baselines), on val where the data set has it: the stages' means and whether they
    rise; the group stage's recovery (ARI); the best baseline's final stage and the default's stage 3
    against it. Means over the seeds that finished (min-max in the data set's own table); a shortfall
    whose min-max bands meet is "within band" (one seed each: the bands are points, and none is)."""
    metric = task_spec(ds.task).metrics[0]
    split = "val" if "val" in ds.splits else ds.splits[0]
    lower = metric in RAW                      # MAE / RMSE: lower is better
    sign = -1 if lower else 1

    def band(method, stage):
        r = next((r for r in rows if r["method"] == method and r["stage"] == stage), None)
        return None if r is None else r["values"].get((split, metric)), (r or {}).get("seeds", 0)

    def overlaps(worse, better):
        # the seed bands (min-max) of two rows meet: a difference of means inside the seeds' spread
        return worse[2] >= better[1] if not lower else worse[1] <= better[2]
    stages = [band("proper-fed", s) for s in ("population", "group", "user")]
    if any(b is None for b, _ in stages):
        return None
    (pop_b, seeds), (grp_b, _), (usr_b, _) = stages
    pop, grp, usr = pop_b[0], grp_b[0], usr_b[0]
    steps = [(grp_b, pop_b), (usr_b, grp_b)]
    if all(sign * (later[0] - earlier[0]) >= 0 for later, earlier in steps):
        rises = "yes"
    elif all(sign * (later[0] - earlier[0]) >= 0 or overlaps(later, earlier) for later, earlier in steps):
        rises = "within band"
    else:
        rises = "no"
    group_row = next((r for r in rows if r["method"] == "proper-fed" and r["stage"] == "group"), {})
    best = None
    for m in BASELINES:
        final = {"population": "population", "oppu": "user", "rag": "rag"}[m]
        b, _ = band(m, final)
        if b is not None and (best is None or sign * (b[0] - best[1]) > 0):
            best = (m, b[0], b)
    scale = (lambda v: f"{v:.3f}") if lower else (lambda v: f"{100 * v:.1f}")   # noqa: E731
    if best is None:
        verdict = "-"
    else:
        diff = sign * (usr - best[1])
        word = "yes" if diff >= 0 else "within band" if overlaps(usr_b, best[2]) else "no"
        verdict = word + f" ({'+' if diff >= 0 else '-'}{scale(abs(diff))})"
    ari = group_row.get("ari")
    return [ds.name, f"{split} {metric}", str(seeds), scale(pop), scale(grp), scale(usr), rises,
            "-" if ari is None else f"{ari[0]:.2f}", "-" if best is None else f"{best[0]} {scale(best[1])}", verdict]


def bars_table(sets, rows_by_ds: dict) -> str:
    lines = [bars(ds, rows_by_ds.get(ds.name, [])) for ds in sets]
    lines = [x for x in lines if x]
    if not lines:
        return ""
    head = ["data set", "metric", "seeds", "population", "group", "user", "rises", "group ARI",
            "best of population-only, OPPU, RAG", "stage 3 at or above it"]
    return "\n".join(["### The issue's bars: the default (proper-fed) on each data set", "",
                      "Means over the seeds that finished; \"rises\": population <= group <= user on the means "
                      "(lower for MAE / RMSE), \"within band\" where a step down (or stage 3 under the best "
                      "baseline) is inside the seeds' min-max bands, which meet; the baselines' final stages.", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(x) + " |" for x in lines)]) + "\n"


def write_tables(out: Path, datasets, cells: list[dict]) -> str:
    """The tables of the planned `cells` (those with a result; the others counted as not run)."""
    results, refs = load_results(out)
    names = {c["name"] for c in cells}
    results = [r for r in results if r["name"] in names]
    parts, csv_rows, fig = [], [], []
    for side, title in (("dev", "Dev side (choose here)"), ("heldout", "Held-out side (report only)")):
        sets = [d for d in datasets if d.side == side]
        if not sets:
            continue
        parts.append(f"## {title}\n")
        by_ds = {}
        for ds in sets:
            mine = [r for r in results if r["dataset"] == ds.name]
            rows = by_ds[ds.name] = summarise(ds, mine)
            planned = sum(c["dataset"] == ds.name for c in cells)
            done = sum(bool(r.get("finished")) for r in mine)
            parts.append(_table(ds, rows, refs.get(ds.name, []), planned, done, len(mine) - done))
            fig.append((ds, rows))
            for r in rows:
                for (sp, m), b in r["values"].items():
                    if b is None:
                        continue
                    csv_rows.append([r["side"], r["dataset"], r["task"], r["method"], r["stage"], int(r["final"]),
                                     sp, m,
                                     r["seeds"], *(f"{x:.6g}" for x in b),
                                     "" if r["passes"] is None else f"{r['passes'][0]:.4g}",
                                     "" if r["examples_seen"] is None else f"{r['examples_seen'][0]:.0f}",
                                     *(("", "", "") if r["wall_s"] is None else (f"{x:.1f}" for x in r["wall_s"]))])
        summary = bars_table(sets, by_ds)
        if summary:
            parts.append(summary)
    md = ("# Benchmark suite\n\nEach value: mean [min, max] over the run seeds that finished; **bold** stage: the "
          "method's final stage. Percent metrics x100; MAE / RMSE as they are (lower is better). passes: over the "
          "training data, all stages; examples seen: passes x training items; wall s: each cell's process.\n\n"
          f"- {LOOKUP_NOTE}\n\n" + "\n".join(parts))
    atomic_write_text(out / "suite.md", md)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["side", "dataset", "task", "method", "stage", "final", "split", "metric", "seeds", "mean", "min",
                "max", "passes", "examples_seen", "wall_mean", "wall_min", "wall_max"])
    w.writerows(csv_rows)
    atomic_write_text(out / "suite.csv", buf.getvalue())
    plot(fig, out / "suite.png")
    return md


def plot(fig_rows, path: Path):
    """One panel per data set with results: each method's final-stage headline metric (val where the
    data set has a val split), the bar its mean, the whisker its min-max over seeds."""
    panels = [(ds, [r for r in rows if r["final"]]) for ds, rows in fig_rows]
    panels = [(ds, rows) for ds, rows in panels if rows]
    if not panels:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(panels)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    f, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
    for ax, (ds, rows) in zip(axes.flat, panels):
        split, metric = ("val" if "val" in ds.splits else ds.splits[0]), task_spec(ds.task).metrics[0]
        scale = 1 if metric in RAW else 100
        names, means, err = [], [], [[], []]
        for r in rows:
            b = r["values"].get((split, metric))
            if b is None:
                continue
            names.append(r["method"])
            means.append(b[0] * scale)
            err[0].append((b[0] - b[1]) * scale)
            err[1].append((b[2] - b[0]) * scale)
        ax.bar(range(len(names)), means, yerr=err, capsize=3, color="0.6")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{ds.name} ({ds.side}): {split} {metric}", fontsize=8)
        ax.set_ylabel(metric if metric in RAW else f"{metric} %", fontsize=7)
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)
