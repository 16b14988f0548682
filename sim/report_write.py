"""What `proper report` (sim/report.py) writes from its rows: the markdown tables, the CSV and
one bar chart per split of the headline metric with its CI.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np


def _fmt_bytes(n) -> str:
    if n is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def markdown_tables(rows, metrics, splits, runs, command) -> str:
    split_titles = {"test": "test: the users' LaMP questions", "val": "val: held-out profile items (never trained on)"}
    text = "# Methods compared\n\n"
    if command:
        text += f"Made by: `{command}`\n\n"
    for split in splits:
        text += f"## {split_titles.get(split, split)}\n\n"
        head = ["method / stage", *metrics, "users", "stored/user", "sent/client/round (mean, max)", "wall"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [r for r in rows if r["split"] == split]:
            cells = [r["label"]]
            for m in metrics:
                v = r["metrics"].get(m)
                c = "" if v is None else f"{v:.4f}"
                ci = r["ci"].get(m)
                if ci:
                    c += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                cells.append(c)
            sent = "" if r["sent_mean"] is None else (f"{_fmt_bytes(r['sent_mean'])}, {_fmt_bytes(r['sent_max'])}"
                                                       + (" (computed)" if r["sent_source"] == "computed" else ""))
            cells += [str(r.get("users") or ""), _fmt_bytes(r["stored"]), sent,
                      "" if r["wall"] is None else f"{r['wall']:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        text += "\n".join(lines) + "\n\n"
    text += "Notes\n\n"
    text += ("- [lo, hi]: 95 % percentile bootstrap CI over users of the headline metric; reference rows "
             "marked (SOURCE.md) are the documented values, the others are computed from the runs' data on "
             "the same split\n")
    text += ("- stored/user: the user's private files on its client (UserStore), mean over users; "
             "sent/client/round: array bytes of one client's reply to one training round (wire audit, "
             "else computed from the shared parameters' shapes); wall: the run's wall time\n")
    kinds = {r["label"]: r["stored_kinds"] for r in rows
             if r["stored_kinds"] and r["split"] == splits[0] and r["stage"] in ("user", "mta")}
    if kinds:
        text += "- stored/user by kind: " + "; ".join(
            f"{label}: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(ks.items()))
            for label, ks in kinds.items()) + "\n"
    for run in runs:
        text += f"- {run.label}: `{run.path}`; privacy: {run.privacy()}\n"
    return text


def csv_rows(rows, metrics) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["split", "row", "method", "stage", *metrics, "ci_lo", "ci_hi", "users", "examples",
                "bytes_stored_per_user", "bytes_sent_per_client_round_mean", "bytes_sent_per_client_round_max",
                "bytes_sent_source", "wall_seconds", "run"])
    for r in rows:
        ci = r["ci"].get(metrics[0]) or ["", ""]
        w.writerow([r["split"], r["label"], r["method"], r["stage"], *[_num(r["metrics"].get(m)) for m in metrics],
                    _num(ci[0]), _num(ci[1]), r.get("users", ""), r.get("examples", ""), _num(r["stored"]),
                    _num(r["sent_mean"]), _num(r["sent_max"]), r["sent_source"], _num(r["wall"]), r["run"]])
    return buf.getvalue()


def _num(v):
    if v is None or v == "":
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_metric(rows, metric, split, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    part = [r for r in rows if r["split"] == split and metric in r["metrics"]]
    if not part:
        return
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(part) + 1.6))
    ys = np.arange(len(part))[::-1]
    for y, r in zip(ys, part):
        v = r["metrics"][metric]
        ci = r["ci"].get(metric)
        color = "#999" if r["method"] == "reference" else ("#a47" if r["stage"] in ("user", "mta") else "#47a")
        err = None if not ci else [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
        ax.barh(y, v, color=color, alpha=0.85, xerr=err, capsize=3)
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in part], fontsize=8)
    ax.set_xlabel(f"{metric} (95 % bootstrap CI over users)")
    ax.set_title(f"{metric} per method, split {split}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

