"""A run directory people can read: resolved config, per-round metrics, the per-stage table,
per-user results and plots.

  runs/<name>/config.yaml        the resolved configuration
  runs/<name>/rounds.jsonl       one line per training round / evaluation (appended, flushed)
  runs/<name>/table.md           stage -> metrics, users covered, examples (the headline result)
  runs/<name>/table.json         the same, for programs
  runs/<name>/per_user.csv       per-user score per stage (ids only where they never left a client)
  runs/<name>/stages.png         metric per stage; training loss per round
  runs/<name>/mixtures.png       user-by-expert mixture heatmap (the learned groups)
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from shared.runtime.persist import atomic_write_text

STAGE_TITLES = {"base": "bare backbone", "base-chat": "bare backbone, chat template",
                "rag": "RAG: bare backbone + the user's retrieved items",
                "population": "stage 1: population",
                "group": "stage 2: group", "user": "stage 3: user",
                "mta_merge": "MTA: merged anchors", "mta": "MTA: merged + stacked LoRA"}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, yaml_text: str):
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def log(self, record: dict):
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "rounds.jsonl", "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        p = self.path / "rounds.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_table(self, rows: list[dict], metric_names: list[str], notes: list[str] = ()) -> str:
        text = format_table(rows, metric_names, notes)
        atomic_write_text(self.path / "table.md", text)
        atomic_write_text(self.path / "table.json", json.dumps(rows, indent=2, default=_jsonable))
        return text

    def write_per_user(self, per_user: dict[str, dict[str, float]], stages: list[str]):
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["user", *stages])
        for user, scores in per_user.items():
            w.writerow([user, *[_fmt(scores.get(s)) for s in stages]])
        atomic_write_text(self.path / "per_user.csv", buf.getvalue())


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def eval_rows(spec, evals: dict) -> list[dict]:
    """evals: {stage: {split: {"stats": {name: list}, "user_scores": [float]}}} -> table rows,
    split by split, stages in PROPER's order, with a bootstrap CI over users of the first metric."""
    from shared.evaluation.metrics import bootstrap_ci, stats_metrics
    splits = list(dict.fromkeys(sp for by_split in evals.values() for sp in by_split))
    rows = []
    for split in splits:
        for stage in STAGE_TITLES:
            ev = evals.get(stage, {}).get(split)
            if not ev or not ev.get("stats"):
                continue
            stats = {k: np.asarray(v, float) for k, v in ev["stats"].items()}
            row = {"stage": stage, "split": split, "metrics": stats_metrics(spec, stats),
                   "users": len(ev["user_scores"]), "examples": int(stats["n"][0])}
            if len(ev["user_scores"]) > 1:
                _, lo, hi = bootstrap_ci(ev["user_scores"])
                row["ci"] = {spec.metrics[0]: (lo, hi)}
            rows.append(row)
    return rows


def table_notes(spec, cfg, how_run: list[str], no_history: int, findings: list[str], privacy: str) -> list[str]:
    """The lines under the per-stage table, for `proper local` and a federated run alike: what was
    evaluated, how the run ran (how_run), users with no history, what the run found (findings), and
    what it guarantees (privacy)."""
    notes = [f"task {spec.name}, predictions by {cfg.eval.mode}; method {cfg.method}; "
             f"[lo, hi] = 95 % bootstrap CI of {spec.metrics[0]} over users", *how_run]
    if no_history:
        notes.append(no_history_note(no_history))
    return notes + findings + [privacy]


def write_results(run: RunDir, spec, rows: list[dict], notes: list[str], mixtures) -> str:
    """The per-stage table (table.md, table.json), its plot and the users' mixtures' heatmap."""
    table = run.write_table(rows, spec.metrics, notes)
    plot_stages(run, rows, spec.metrics[0])
    if mixtures is not None and len(mixtures):
        plot_mixtures(run, mixtures.numpy())
    return table


def no_history_note(n: int) -> str:
    """The table's line for users whose profile was empty (client/trainer.py)."""
    return (f"users with no history: {n} (skipped in training; evaluated in every stage, served by the "
            "population and group stages with the population's mean mixture, no user LoRA)")


def format_table(rows: list[dict], metric_names: list[str], notes=()) -> str:
    """rows: {stage, split, metrics: {name: value}, users, examples, [ci], [nodes]}; one table per split."""
    text = ""
    for split in dict.fromkeys(r.get("split", "test") for r in rows):
        part = [r for r in rows if r.get("split", "test") == split]
        title = {"test": "test: the users' LaMP questions", "val": "val: held-out profile items (never trained on)"}
        text += f"### {title.get(split, split)}\n\n" + _one_table(part, metric_names) + "\n"
    if notes:
        text += "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def _one_table(rows: list[dict], metric_names: list[str]) -> str:
    with_nodes = any("nodes" in r for r in rows)
    head = ["stage", *metric_names, "users", "examples"] + (["nodes"] if with_nodes else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [STAGE_TITLES.get(r["stage"], r["stage"])]
        for m in metric_names:
            v = r["metrics"].get(m)
            cell = "" if v is None else f"{v:.4f}"
            ci = (r.get("ci") or {}).get(m)
            if ci:
                cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(cell)
        users = f"{r.get('users', '')}" + (f"/{r['users_total']}" if r.get("users_total") not in (None, "") else "")
        cells += [users, str(r.get("examples", ""))] + ([r.get("nodes", "")] if with_nodes else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_stages(run: RunDir, rows: list[dict], metric: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = run.records()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in rows if r.get("split", "test") == rows[0].get("split", "test")] if rows else rows
    names = [STAGE_TITLES.get(r["stage"], r["stage"]) for r in rows]
    vals = [r["metrics"].get(metric, np.nan) for r in rows]
    axes[0].bar(range(len(vals)), vals, color=["#999", "#4a7", "#47a", "#a47"][: len(vals)])
    axes[0].set_xticks(range(len(vals)), names, rotation=15)
    axes[0].set_ylabel(metric)
    axes[0].set_title(f"{metric} per stage ({rows[0].get('split', 'test') if rows else ''})")
    for i, v in enumerate(vals):
        if np.isfinite(v):
            axes[0].text(i, v, f"{v:.3f}", ha="center", va="bottom")
    for stage, color in (("population", "#4a7"), ("group", "#47a")):
        pts = [(r["round"], r["train_loss"]) for r in records
               if r.get("kind") == "train" and r.get("stage") == stage and "train_loss" in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", color=color, label=STAGE_TITLES[stage])
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("training loss")
    axes[1].set_title("training loss per round")
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(run.path / "stages.png", dpi=110)
    plt.close(fig)


def plot_mixtures(run: RunDir, mixtures: np.ndarray):
    """mixtures: [U, L, k] user mixtures (rows anonymous); mean over layers, sorted by group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = np.asarray(mixtures).mean(axis=1)
    groups = m.argmax(1)
    order = np.lexsort((-m.max(1), groups))
    fig, ax = plt.subplots(figsize=(5, max(3, 0.08 * len(m) + 1.5)))
    im = ax.imshow(m[order], aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("user (sorted by group)")
    ax.set_xticks(range(m.shape[1]))
    counts = np.bincount(groups, minlength=m.shape[1])
    ax.set_title("user mixtures p_u; users per group: " + ", ".join(map(str, counts)), fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(run.path / "mixtures.png", dpi=110)
    plt.close(fig)
