"""LaMP metrics, one path for every run: per-example values -> sufficient statistics -> metrics.

A client turns its users' predictions into sufficient statistics (counts and sums, never texts or
labels per example), a server adds up what clients send (add_stats), and stats_metrics turns the
totals into exactly the metric over all users, as if computed on every prediction at once:
  label       n, correct, and per-label tp / fp / fn     -> accuracy, macro-F1
  rating      n, sum |err|, sum err^2                    -> MAE, RMSE
  generation  n, sum ROUGE-1, sum ROUGE-L                -> ROUGE-1, ROUGE-L

The definitions are LaMP's own evaluation's. Label tasks: accuracy and macro-F1 over the task's
full label set (sklearn's f1_score with labels=<all labels>, zero_division=0: a label nobody
predicted and nobody has as gold still counts, with F1 = 0). Rating task: MAE and RMSE, where an
answer that is not a number counts as whichever of 1 and 5 is farther from the gold. Generation
tasks: ROUGE-1 and ROUGE-L F-measure (the rouge-score package, as LaMP's HF evaluate "rouge" calls
it: no stemming), averaged over examples. Labels are compared after strip + lowercase.
"""
import math

import numpy as np


def _norm(s) -> str:
    return str(s).strip().lower()


def _check(preds, golds) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")


# ---------------------------------------------------------------- per example
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


def rating_errors(preds, golds) -> np.ndarray:
    """|prediction - gold| per example, with LaMP's rule for answers that are not numbers."""
    _check(preds, golds)
    return np.array([abs(_rating(p, _gold_rating(g)) - _gold_rating(g)) for p, g in zip(preds, golds)], float)


_scorer = None


def rouge_scores(preds, golds) -> np.ndarray:
    """[N, 2]: ROUGE-1 and ROUGE-L F-measure of each prediction against its gold."""
    global _scorer
    _check(preds, golds)
    if _scorer is None:   # building one is cheap but not free, and every evaluation calls this
        from rouge_score import rouge_scorer
        _scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    out = np.zeros((len(golds), 2))
    for i, (p, g) in enumerate(zip(preds, golds)):
        s = _scorer.score(str(g).strip(), str(p).strip())   # score(target, prediction)
        out[i] = s["rouge1"].fmeasure, s["rougeL"].fmeasure
    return out


def correct(preds, golds) -> np.ndarray:
    """1.0 where the prediction is the gold label (after strip + lowercase), else 0.0."""
    _check(preds, golds)
    return np.array([_norm(p) == _norm(g) for p, g in zip(preds, golds)], float)


def per_example_scores(task_spec, preds, golds) -> list[float]:
    """One number per example, for per-user tables: 1/0 correct (label), absolute error (rating,
    lower is better), ROUGE-L F (generation)."""
    kind = task_spec.kind
    if kind == "label":
        return correct(preds, golds).tolist()
    if kind == "rating":
        return rating_errors(preds, golds).tolist()
    if kind == "generation":
        return rouge_scores(preds, golds)[:, 1].tolist()
    raise ValueError(f"unknown task kind {kind!r}")


def accuracy(preds, golds) -> float:
    """The fraction of predictions that are the gold label (what the label tasks' stats count)."""
    if not golds:
        raise ValueError("no examples to score")
    return float(correct(preds, golds).mean())


# ---------------------------------------------------------------- sufficient statistics
def example_stats(spec, preds: list[str], golds: list[str]) -> dict[str, np.ndarray]:
    """The sufficient statistics of one set of predictions (any number, none included)."""
    _check(preds, golds)
    n = np.array([len(golds)], float)
    if spec.kind == "label":
        p, g = [_norm(x) for x in preds], [_norm(x) for x in golds]
        labels = [_norm(x) for x in spec.labels]
        # a prediction outside the label set is wrong and a false positive of no label
        tp = np.array([sum(a == lab and b == lab for a, b in zip(p, g)) for lab in labels], float)
        fp = np.array([sum(a == lab and b != lab for a, b in zip(p, g)) for lab in labels], float)
        fn = np.array([sum(a != lab and b == lab for a, b in zip(p, g)) for lab in labels], float)
        return {"n": n, "correct": np.array([correct(preds, golds).sum()]), "tp": tp, "fp": fp, "fn": fn}
    if spec.kind == "rating":
        err = rating_errors(preds, golds)
        return {"n": n, "abs_err": np.array([err.sum()]), "sq_err": np.array([(err ** 2).sum()])}
    if spec.kind == "generation":
        r = rouge_scores(preds, golds).sum(0)
        return {"n": n, "rouge1": np.array([r[0]]), "rougeL": np.array([r[1]])}
    raise ValueError(f"unknown task kind {spec.kind!r}")


def add_stats(a: dict | None, b: dict) -> dict:
    if not a:
        return {k: np.array(v, float).copy() for k, v in b.items()}
    if set(a) != set(b):
        raise ValueError(f"cannot add statistics with keys {sorted(a)} and {sorted(b)}")
    return {k: a[k] + np.asarray(b[k], float) for k in a}


def stats_metrics(spec, s: dict) -> dict[str, float]:
    """The metrics of summed statistics; {} for no examples."""
    n = float(s["n"][0])
    if n == 0:
        return {}
    if spec.kind == "label":
        # 2tp / (2tp + fp + fn) is F1 without dividing by a zero precision or recall
        denom = 2 * s["tp"] + s["fp"] + s["fn"]
        f1 = np.divide(2 * s["tp"], denom, out=np.zeros_like(denom), where=denom > 0)
        return {"accuracy": float(s["correct"][0] / n), "macro_f1": float(f1.mean())}
    if spec.kind == "rating":
        return {"mae": float(s["abs_err"][0] / n), "rmse": math.sqrt(float(s["sq_err"][0] / n))}
    return {"rouge-1": float(s["rouge1"][0] / n), "rouge-L": float(s["rougeL"][0] / n)}


def task_metrics(spec, preds, golds) -> dict[str, float]:
    """The metrics of one set of predictions, through the same statistics a run sums."""
    return stats_metrics(spec, example_stats(spec, preds, golds))


# ---------------------------------------------------------------- predictions and intervals
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


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap of the mean over users: (mean, lo, hi). The values are sorted first: the
    clients send their users' scores shuffled and the server pools replies in arrival order, so
    without it two runs with the same scores drew different resamples (different CIs)."""
    v = np.sort(np.asarray(list(values), dtype=float))
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)
