"""Stage 1 on Flower's own strategies: only the message type differs (train.population), so the
population LoRA is averaged by "num-examples" and stepped by FedAvg/FedAvgM/FedAdam/FedYogi as
Flower writes them."""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

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


class PopulationMessages(FedAvg):
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for m in messages:
            m.metadata.message_type = P.TRAIN_POPULATION
        return messages
