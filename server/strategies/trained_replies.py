"""The outermost wrapper of a stage's strategy: only the replies that trained on something count."""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.runtime import protocol as P


class TrainedReplies(Strategy):
    """A strategy that aggregates only the replies that trained on something. A client whose users
    all have no history replies with zero examples (client/trainer.py): it weighs nothing in the
    average anyway, and a round where only such clients answered keeps the parameters as they were,
    as a round where every client failed does, where Flower's average would divide by zero."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        trained = [r for r in replies if r.has_error() or float(r.content[P.METRICS].get(P.NUM_EXAMPLES, 1)) > 0]
        if not trained:
            return None, None
        return self.strategy.aggregate_train(server_round, trained)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
