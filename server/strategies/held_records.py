"""What Flower's DP wrapper wraps under privacy.dp: the stage's average, given back the records
PrivateAverage held aside while Flower clipped (privacy.py)."""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

DP_WEIGHT = "dp-weight"   # the server's own weight key under DP (never on the wire): 1 per reply


class HeldRecords(Strategy):
    """held: {id(reply): {record name: record}}, filled by PrivateAverage for the round."""

    def __init__(self, average: Strategy, held: dict[int, dict]):
        self.average, self.held = average, held

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.average.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        for r in replies:   # the routing statistics, held aside while Flower clipped
            for name, record in self.held.pop(id(r), {}).items():
                r.content[name] = record
        arrays, metrics = self.average.aggregate_train(server_round, replies)
        if metrics is not None and DP_WEIGHT in metrics:
            del metrics[DP_WEIGHT]
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.average.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.average.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.average.summary()
