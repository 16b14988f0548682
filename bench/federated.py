"""Summarise federated-optimization runs against the centralized band: docs/results/federated.md.

  python -m bench.federated RUN [RUN ...] --out docs/results/federated [--labels a,b,...]

Runs that share a label (default: the run directory's name without a trailing "-s<seed>") are
seeds of one configuration: each stage's accuracy is reported as the mean and [min, max] over them.
Per configuration: val and test accuracy per stage; client compute in passes over the training
data (rounds x epochs x the share of users sampled per round; the group stage's first pool, a
forward pass, counted as a third of a pass); the modelled deployment wall time in client-times
(per round, the longest chain: ceil(sampled clients / chains); a centralized run is one client
doing everything: its passes x users); the measured wall time on this machine. Writes
<out>.md, <out>.csv and <out>.png (stage-3 val accuracy against client compute per configuration,
the centralized band shaded).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from server.strategies.chains import sampled_nodes, split_chains
from shared.method.plan import initial_pool
from shared.runtime.config import load_config

STAGES = ("population", "group", "user")


def _users(run: Path) -> int:
    rows = json.loads((run / "table.json").read_text())
    return max(int(r["users"]) for r in rows)


def with_defaults(record):
    """A run's recorded config with the keys it predates at the schema's defaults (what such a run
    ran with), read as given: keys a later version removed stay, unchecked."""
    return OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(load_config(None, []))), record)


def compute(cfg, users: int, federated: bool) -> dict:
    """Passes over the training data per stage, and the modelled client-times of the whole run."""
    full = with_defaults(cfg)
    sampled, longest_chain = users, users
    if federated:   # the server's own sampling and chains, one user per client
        nodes = sampled_nodes(range(users), full, "population", 1)
        sampled, longest_chain = len(nodes), max(len(c) for c in split_chains(nodes, full.federation.chains))
    share = sampled / users
    # the plan's own rule; runs made before group.initial_pool existed had no first pool
    first_pool = federated and "initial_pool" in cfg.group and initial_pool(full)
    passes, client_times = {}, 0.0
    for stage in STAGES:
        rounds = int(cfg[stage].get("rounds", 1) or 1) if stage != "user" else 1
        epochs = int(cfg[stage].get("epochs", cfg.train.get("epochs", 1)) or 1)
        p = rounds * epochs * (share if stage != "user" else 1.0)
        if stage == "group" and first_pool:
            p += share / 3
        passes[stage] = p
        if federated:  # a round's wall time: its longest chain; the user stage: one client's users
            client_times += rounds * epochs * longest_chain if stage != "user" else epochs
        else:
            client_times += p * users
    return {"passes": passes, "total_passes": sum(passes.values()), "client_times": client_times}


def read_run(run: Path) -> dict:
    cfg = OmegaConf.load(run / "config.yaml")
    rows = json.loads((run / "table.json").read_text())
    acc = {(r["stage"], r["split"]): r["metrics"]["accuracy"] for r in rows if "accuracy" in r.get("metrics", {})}
    notes = (run / "table.md").read_text()
    wall = re.search(r"wall time ([0-9.]+) s", notes)
    federated = "SuperNodes" in notes   # a federated run's table names its nodes
    return {"cfg": cfg, "acc": acc, "wall": float(wall.group(1)) if wall else float("nan"),
            "federated": federated, **compute(cfg, _users(run), federated)}


def summarise(groups: dict[str, list[dict]]) -> list[dict]:
    out = []
    for label, runs in groups.items():
        row = {"label": label, "seeds": len(runs), "federated": runs[0]["federated"],
               "passes": runs[0]["total_passes"], "client_times": runs[0]["client_times"],
               "wall": float(np.mean([r["wall"] for r in runs]))}
        for stage in STAGES:
            for split in ("val", "test"):
                vals = [r["acc"][(stage, split)] * 100 for r in runs if (stage, split) in r["acc"]]
                row[f"{stage}.{split}"] = (float(np.mean(vals)), min(vals), max(vals)) if vals else None
        out.append(row)
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    mean, lo, hi = v
    return f"{mean:.1f}" if lo == hi else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def markdown(rows: list[dict]) -> str:
    head = ["configuration", "seeds", *(f"{s} {sp}" for sp in ("val", "test") for s in STAGES),
            "client passes", "client-times (modelled)", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r["seeds"]), *(_cell(r[f"{s}.{sp}"]) for sp in ("val", "test") for s in STAGES),
                 f"{r['passes']:.2f}", f"{r['client_times']:.0f}", f"{r['wall']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        v = r["user.val"]
        if v is None:
            continue
        if not r["federated"]:  # the band every federated result is read against
            ax.axhspan(v[1] - 0.3, v[2] + 0.3, color="0.88", zorder=0)
            ax.axhline(v[0], color="0.4", lw=1, ls="--", zorder=1)
            ax.plot([r["passes"]], [v[0]], "s", color="0.3")
            ax.annotate(f"centralized: {r['label']}", (r["passes"], v[0]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
            continue
        ax.errorbar([r["passes"]], [v[0]], yerr=[[v[0] - v[1]], [v[2] - v[0]]], fmt="o", capsize=3)
        ax.annotate(r["label"], (r["passes"], v[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("client compute (passes over the training data, all stages)")
    ax.set_ylabel("stage 3 (user) val accuracy, %")
    ax.set_title("Federated PROPER vs the centralized band (shaded: min-max over seeds)", fontsize=10)
    ax.set_xlim(0, max(r["passes"] for r in rows) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix: writes <out>.md, <out>.csv, <out>.png")
    ap.add_argument("--labels", default=None, help="comma-separated, one per run (same label = seeds)")
    a = ap.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [re.sub(r"-s\d+$", "", Path(r).name) for r in a.runs]
    groups: dict[str, list[dict]] = {}
    for label, run in zip(labels, a.runs):
        groups.setdefault(label, []).append(read_run(Path(run)))
    rows = summarise(groups)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        cols = [f"{s}.{sp}" for s in STAGES for sp in ("val", "test")]
        w.writerow(["label", "seeds", "passes", "client_times", "wall", *cols])
        for r in rows:
            w.writerow([r["label"], r["seeds"], f"{r['passes']:.3f}", f"{r['client_times']:.0f}", f"{r['wall']:.0f}",
                        *("" if r[c] is None else f"{r[c][0]:.2f}" for c in cols)])
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
