"""LaMP metrics, computed the way LaMP's own evaluation does.

Label tasks: accuracy and macro-F1 over the task's full label set (sklearn's f1_score with
labels=<all labels>, zero_division=0: a label nobody predicted and nobody has as gold still
counts, with F1 = 0). Rating task: MAE and RMSE, where an answer that is not a number counts as
whichever of 1 and 5 is farther from the gold. Generation tasks: ROUGE-1 and ROUGE-L F-measure,
averaged over examples. Texts are compared after strip + lowercase.

ROUGE follows LaMP, which calls HF evaluate's "rouge" without stemming: use_stemmer=False by
default (pass True for stemmed ROUGE).
"""

import math

import numpy as np


def _norm(s) -> str:
    return str(s).strip().lower()


def _check(preds, golds) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")
    if not golds:
        raise ValueError("no examples to score")


def accuracy(preds, golds) -> float:
    _check(preds, golds)
    return sum(_norm(p) == _norm(g) for p, g in zip(preds, golds)) / len(golds)


def macro_f1(preds, golds, labels) -> float:
    """Mean over `labels` of per-label F1; predictions outside the set hit no label."""
    _check(preds, golds)
    p = [_norm(x) for x in preds]
    g = [_norm(x) for x in golds]
    f1s = []
    for lab in (_norm(x) for x in labels):
        tp = sum(a == lab and b == lab for a, b in zip(p, g))
        fp = sum(a == lab and b != lab for a, b in zip(p, g))
        fn = sum(a != lab and b == lab for a, b in zip(p, g))
        # 2tp / (2tp + fp + fn) is F1 without dividing by zero precision or recall
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return sum(f1s) / len(f1s)


def _rating(pred, gold: float) -> float:
    try:
        v = float(str(pred).strip())
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        # LaMP's rule: an unusable answer scores as the worst end of the 1..5 scale;
        # "nan"/"inf" parse as floats but would poison the mean, so they get the same rule
        v = 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0
    return v


def _gold_rating(g) -> float:
    try:
        return float(str(g).strip())
    except ValueError:
        raise ValueError(f"gold rating {g!r} is not a number") from None


def mae_rmse(preds, golds) -> tuple[float, float]:
    _check(preds, golds)
    errs = []
    for p, g in zip(preds, golds):
        gv = _gold_rating(g)
        errs.append(_rating(p, gv) - gv)
    mae = sum(abs(e) for e in errs) / len(errs)
    rmse = math.sqrt(sum(e * e for e in errs) / len(errs))
    return mae, rmse


_scorers = {}


def _rouge_scorer(use_stemmer: bool):
    # building a scorer is cheap but not free; per-example loops call this a lot
    if use_stemmer not in _scorers:
        from rouge_score import rouge_scorer
        _scorers[use_stemmer] = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    return _scorers[use_stemmer]


def _rouge_each(preds, golds, use_stemmer: bool) -> list[tuple[float, float]]:
    sc = _rouge_scorer(use_stemmer)
    out = []
    for p, g in zip(preds, golds):
        s = sc.score(str(g).strip(), str(p).strip())  # score(target, prediction)
        out.append((s["rouge1"].fmeasure, s["rougeL"].fmeasure))
    return out


def rouge(preds, golds, use_stemmer: bool = False) -> dict[str, float]:
    _check(preds, golds)
    each = _rouge_each(preds, golds, use_stemmer)
    return {"rouge-1": sum(r1 for r1, _ in each) / len(each),
            "rouge-L": sum(rl for _, rl in each) / len(each)}


def match_label(text, labels):
    """Map generated text to a label: exact match after normalisation, else the label the text
    starts with (the longest one, so "dark comedy ..." is not read as "comedy"), else None."""
    t = _norm(text).strip("\"'`* ")
    by_norm = {_norm(lab): lab for lab in labels}
    if t in by_norm:
        return by_norm[t]
    best = None
    for n, lab in by_norm.items():
        # the label must end at a word boundary: "classical" is not "classic"
        if t.startswith(n) and (len(t) == len(n) or not t[len(n)].isalnum()):
            if best is None or len(n) > len(_norm(best)):
                best = lab
    return best


def task_metrics(task_spec, preds, golds) -> dict[str, float]:
    kind = task_spec.kind
    if kind == "label":
        return {"accuracy": accuracy(preds, golds),
                "macro_f1": macro_f1(preds, golds, task_spec.labels)}
    if kind == "rating":
        mae, rmse = mae_rmse(preds, golds)
        return {"mae": mae, "rmse": rmse}
    if kind == "generation":
        return rouge(preds, golds)
    raise ValueError(f"unknown task kind {kind!r}")


def per_example_scores(task_spec, preds, golds) -> list[float]:
    """One number per example for per-user tables: 1/0 correct (label), absolute error
    (rating, lower is better), ROUGE-L F (generation)."""
    _check(preds, golds)
    kind = task_spec.kind
    if kind == "label":
        return [float(_norm(p) == _norm(g)) for p, g in zip(preds, golds)]
    if kind == "rating":
        return [abs(_rating(p, _gold_rating(g)) - _gold_rating(g)) for p, g in zip(preds, golds)]
    if kind == "generation":
        return [rl for _, rl in _rouge_each(preds, golds, False)]
    raise ValueError(f"unknown task kind {kind!r}")


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap of the mean over users: (mean, lo, hi)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)
