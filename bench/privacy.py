"""The privacy study's table and figures (docs/results/privacy.md) from finished, audited runs:

    python -m bench.privacy RUN [RUN ...] --out docs/results/privacy

For each run (`proper sim ...` then `proper audit RUN`): the noise multiplier, epsilon per stage and
composed (rounds.jsonl's {"kind": "privacy"} record), each stage's headline metric on the first
split of eval.splits (table.json), and per model the mean canary exposure and the membership AUC
(audit.json). Writes privacy.md (markdown table), privacy.csv, accuracy_vs_epsilon.png and
exposure_vs_epsilon.png; a run without DP (star) and one of clipping alone (z = 0, epsilon infinite;
cross) are drawn at the right edge.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

STAGES = ("population", "group", "user")
VIEWS = ("population", "group (mean)", "group (own e_u)", "user")


def read_run(run: Path) -> dict:
    rows = json.loads((run / "table.json").read_text())
    privacy = {"dp": False}
    for line in (run / "rounds.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "privacy":
            privacy = rec
    audit = json.loads((run / "audit.json").read_text()) if (run / "audit.json").is_file() else {"views": {}}
    split = rows[0]["split"] if rows else None
    metric = next(iter(rows[0]["metrics"])) if rows else None
    acc = {r["stage"]: r["metrics"][metric] for r in rows if r["split"] == split}
    eps = {s: privacy.get("stages", {}).get(s, {}).get("epsilon") for s in ("population", "group")}
    return {"run": run.name, "z": privacy.get("noise_multiplier"), "clip": privacy.get("clip"),
            "delta": privacy.get("delta"), "epsilon": privacy.get("epsilon") if privacy.get("dp") else None,
            "eps_stage": eps, "metric": metric, "split": split, "acc": acc,
            "exposure": {v: a.get("exposure") for v, a in audit["views"].items()},
            "auc": {v: a.get("membership_auc") for v, a in audit["views"].items()}}


def _f(v, fmt="{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)


def table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "noise multiplier z", "epsilon (composed)", "epsilon population", "epsilon group"]
    head += [f"{s} {runs[0]['metric']} ({runs[0]['split']})" for s in STAGES]
    head += [f"exposure {v}" for v in VIEWS] + [f"membership AUC {v}" for v in VIEWS]
    out = []
    for r in runs:
        row = [r["run"], _f(r["z"]) if r["z"] is not None else "no DP", _f(r["epsilon"]),
               _f(r["eps_stage"]["population"]), _f(r["eps_stage"]["group"])]
        row += [_f(r["acc"].get(s), "{:.3f}") for s in STAGES]
        row += [_f(r["exposure"].get(v), "{:.2f}") for v in VIEWS]
        row += [_f(r["auc"].get(v), "{:.3f}") for v in VIEWS]
        out.append(row)
    return head, out


def plot(runs: list[dict], out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dp = sorted([r for r in runs if r["epsilon"] is not None and math.isfinite(r["epsilon"])],
                key=lambda r: r["epsilon"])
    plain = [r for r in runs if r["epsilon"] is None]
    clip_only = [r for r in runs if r["epsilon"] is not None and not math.isfinite(r["epsilon"])]
    finite = [r["epsilon"] for r in dp if math.isfinite(r["epsilon"]) and r["epsilon"] > 0]
    right = (max(finite) * 10) if finite else 10.0   # where "no DP" is drawn

    def xs(rs):
        return [r["epsilon"] if math.isfinite(r["epsilon"]) else right for r in rs]
    for name, key, keys, ylabel in (("accuracy_vs_epsilon.png", "acc", STAGES, f"{runs[0]['metric']} "
                                     f"({runs[0]['split']})"),
                                    ("exposure_vs_epsilon.png", "exposure", VIEWS, "canary exposure (bits)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for k in keys:
            ys = [r[key].get(k) for r in dp]
            pts = [(x, y) for x, y in zip(xs(dp), ys) if y is not None]
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)[0]
            for rs, marker in ((plain, "*"), (clip_only, "x")):
                for r in rs:
                    if r[key].get(k) is not None:
                        ax.scatter([right], [r[key][k]], marker=marker, s=120, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("composed epsilon (RDP, no amplification); right edge: * no DP, x clipping alone")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(Path(r)) for r in args.runs]
    head, rows = table(runs)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    (out / "privacy.md").write_text("\n".join(md) + "\n")
    with open(out / "privacy.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    plot(runs, out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
