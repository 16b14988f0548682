"""A paired comparison of two configurations over seeds, from their runs' per-user files.

    python -m bench.paired --column group@val --labels "user-aware,LoRAMoE" \
        --a runA-s0,runA-s1,runA-s2 --b runB-s0,runB-s1,runB-s2 --out compare.md

Run i of --a and run i of --b are one seed of each configuration, on the same users. Per seed it
prints each side's mean of the column over users and the difference a - b; over the seeds, the
mean difference with two 95 % percentile bootstrap intervals: one resamples users alone (the same
users in every seed, so a user's differences in all seeds travel together: the users' sampling,
given these seeds), the other resamples seeds and users together (training noise too; with 3 seeds
a coarse one). Only users with a value in every run count; the column is read as higher = better.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

from shared.runtime.persist import atomic_write_text


def read_column(run: Path, column: str) -> dict[str, float]:
    path = Path(run) / "per_user.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and column not in rows[0]:
        raise SystemExit(f"error: {path} has no column {column!r} (it has {', '.join(rows[0])})")
    if rows and "user" not in rows[0]:
        raise SystemExit(f"error: {path} has no 'user' column")
    values = {}
    for r in rows:
        try:
            v = float(r.get(column) or "nan")
        except ValueError:
            raise SystemExit(f"error: {path}, user {r['user']}: {column} = {r[column]!r} is not a number") from None
        if not math.isnan(v):
            values[r["user"]] = v
    return values


def compare(a_runs: list[Path], b_runs: list[Path], column: str, n_boot: int = 10000, seed: int = 0) -> dict:
    if len(a_runs) != len(b_runs) or not a_runs:
        raise SystemExit("error: --a and --b need the same number of runs (one per seed), at least one")
    a = [read_column(r, column) for r in a_runs]
    b = [read_column(r, column) for r in b_runs]
    users = sorted(set.intersection(*(set(x) for x in a + b)))
    if not users:
        raise SystemExit(f"error: no user has {column} in every run")
    A = np.array([[x[u] for u in users] for x in a])   # [seeds, users]
    B = np.array([[x[u] for u in users] for x in b])
    D = A - B
    diff = D.mean(0)                                     # each user's difference, averaged over seeds
    rng = np.random.default_rng(seed)
    n_s, n_u = D.shape
    users_only = np.array([diff[rng.integers(n_u, size=n_u)].mean() for _ in range(n_boot)])
    both = np.array([D[rng.integers(n_s, size=n_s)][:, rng.integers(n_u, size=n_u)].mean() for _ in range(n_boot)])
    return {"users": n_u, "a": A.mean(1).tolist(), "b": B.mean(1).tolist(), "diff": float(diff.mean()),
            "lo": float(np.percentile(users_only, 2.5)), "hi": float(np.percentile(users_only, 97.5)),
            "lo_seeds": float(np.percentile(both, 2.5)), "hi_seeds": float(np.percentile(both, 97.5)),
            "share_at_or_below_0": float((users_only <= 0).mean())}


def table(r: dict, labels: tuple[str, str], column: str) -> str:
    a, b = labels
    lines = [f"| seed | {a} | {b} | {a} - {b} |", "|---|---|---|---|"]
    for i, (x, y) in enumerate(zip(r["a"], r["b"])):
        lines.append(f"| {i} | {100 * x:.1f} | {100 * y:.1f} | {100 * (x - y):+.1f} |")
    lines.append(f"| mean | {100 * np.mean(r['a']):.1f} | {100 * np.mean(r['b']):.1f} | "
                 f"**{100 * r['diff']:+.1f}** [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]; "
                 f"seeds too [{100 * r['lo_seeds']:+.1f}, {100 * r['hi_seeds']:+.1f}] |")
    return ("\n".join(lines) + f"\n\n{column}, {r['users']} users in every run. First interval: 95 % bootstrap "
            "over users of the seed-averaged paired difference (given these seeds); second: seeds and users "
            f"resampled together. Share of user resamples with {a} - {b} <= 0: {r['share_at_or_below_0']:.3f}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="comma-separated run directories, one per seed")
    ap.add_argument("--b", required=True, help="the other configuration's runs, same seeds, same order")
    ap.add_argument("--column", default="group@val")
    ap.add_argument("--labels", default="a,b")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    labels = tuple(args.labels.split(",", 1)) if "," in args.labels else ("a", "b")
    r = compare([Path(p) for p in args.a.split(",")], [Path(p) for p in args.b.split(",")], args.column)
    text = table(r, labels, args.column)
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text)
    return r


if __name__ == "__main__":
    main()
