"""What Flower's DP wrapper wraps under privacy.dp: the stage's average, given back the records
PrivateAverage held aside while Flower clipped (privacy.py)."""
from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from server.strategies.wrapper import Wrapper

DP_WEIGHT = "dp-weight"   # the server's own weight key under DP (never on the wire): 1 per reply


class HeldRecords(Wrapper):
    """held: {id(reply): {record name: record}}, filled by PrivateAverage for the round."""

    def __init__(self, average: Strategy, held: dict[int, dict]):
        super().__init__(average)
        self.held = held

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        for r in replies:   # the routing statistics, held aside while Flower clipped
            for name, record in self.held.pop(id(r), {}).items():
                r.content[name] = record
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if metrics is not None and DP_WEIGHT in metrics:
            del metrics[DP_WEIGHT]
        return arrays, metrics
