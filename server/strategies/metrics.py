"""The training metrics of a round: examples-weighted means, as every stage's strategy reports them."""
from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from shared.runtime import protocol as P


def mean_scalar_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Examples-weighted mean of each scalar metric; lists (e.g. per-user scores) are skipped."""
    weights = [float(c[P.METRICS][weight_key]) for c in contents]
    total = sum(weights) or 1.0
    out = {}
    for key, value in contents[0][P.METRICS].items():
        if isinstance(value, (int, float)) and key != weight_key:
            out[key] = sum(float(c[P.METRICS].get(key, 0.0)) * w for c, w in zip(contents, weights)) / total
    out[weight_key] = total
    return MetricRecord(out)
