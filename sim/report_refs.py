"""The reference rows of `proper report` (sim/report.py), computed from the data of the runs: the
most frequent training label answered everywhere, each user's own most frequent one, a lookup of
other users' labels for the same input; and, for the LaMP-2 sample, the numbers its SOURCE.md
documents.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

SAMPLE_DOCUMENTED = {  # ../shared/data/lamp/SOURCE.md, on the 72 LaMP questions (test split)
    "most frequent overall tag (SOURCE.md: all 10 profile items)": 0.153,
    "per-user most frequent tag (SOURCE.md: all 10 profile items)": 0.361,
    "SmolLM2-135M-Instruct zero-shot, most likely tag (SOURCE.md)": 0.111,
}


def majority_rows(cfg, splits: list[str]) -> list[dict]:
    """The two majority baselines, on the runs' own users and splits (label and rating tasks)."""
    from shared.data.lamp import load_lamp
    from shared.evaluation.metrics import add_stats, bootstrap_ci, example_stats, per_example_scores, stats_metrics
    d = cfg.data
    spec, users = load_lamp(d.path, task=d.get("task"), holdout=int(d.get("holdout") or 0),
                            max_users=d.get("max_users"), longest=bool(d.get("longest", False)))
    if spec.kind not in ("label", "rating"):
        return []
    if d.get("template", "official") != "official":
        from shared.data.lamp import apply_template
        users = apply_template(users, spec.name, d.template)
    overall = Counter(ex.output for u in users for ex in u.train).most_common(1)[0][0]
    lookup = other_users_labels(users)
    rows = []
    for split in splits:
        for name, pick in ((f"most frequent training label overall ({overall!r})", lambda u, ex: overall),
                           ("each user's most frequent training label", lambda u, ex: _own_majority(u)),
                           ("lookup: another user's label for the same input, else the user's most frequent",
                            lambda u, ex: lookup(u, ex) or _own_majority(u))):
            stats, scores = None, []
            for u in users:
                exs = getattr(u, split)
                if not exs:
                    continue
                preds, golds = [pick(u, ex) for ex in exs], [ex.output for ex in exs]
                stats = add_stats(stats, example_stats(spec, preds, golds))
                scores.append(float(np.mean(per_example_scores(spec, preds, golds))))
            if not stats:
                continue
            row = {"label": name, "stage": "reference", "split": split, "metrics": stats_metrics(spec, stats),
                   "users": len(scores), "examples": int(stats["n"][0])}
            if len(scores) > 1:
                _, lo, hi = bootstrap_ci(scores)
                row["ci"] = {spec.metrics[0]: [lo, hi]}
            rows.append(row)
    return rows


def other_users_labels(users):
    """What remembering other users' training items gives: for a query, the most frequent label
    that other users' training items with exactly the same input carry (None if there are none)."""
    by_input: dict[str, list[tuple[str, str]]] = {}
    for u in users:
        for ex in u.train:
            by_input.setdefault(ex.input, []).append((u.user_id, ex.output))
    def pick(user, ex):
        labels = Counter(lab for uid, lab in by_input.get(ex.input, []) if uid != user.user_id)
        return labels.most_common(1)[0][0] if labels else None
    return pick


def _own_majority(user) -> str:
    counts = Counter(ex.output for ex in user.train)
    best = max(counts.values())
    return next(ex.output for ex in user.train if counts[ex.output] == best)  # first in history among ties


def documented_rows(cfg, splits: list[str], metric: str) -> list[dict]:
    if "test" not in splits or "LaMP_2-movie-tagging-subset" not in str(cfg.data.path):
        return []
    return [{"label": name, "stage": "reference", "split": "test", "metrics": {metric: v}, "users": 72,
             "examples": 72, "documented": True} for name, v in SAMPLE_DOCUMENTED.items()]
