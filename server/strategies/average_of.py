"""The one hook the server optimizers replace: FedAvg's average, taken from another strategy.

Flower's FedAvgM, FedAdam and FedYogi step from `super().aggregate_train` (FedAvg's average) and
record the round's start in `configure_train`. A server optimizer here is that Flower class over
AverageOf: its messages and its average are the inner strategy's (the population average, the
group average, or either under Flower's DP wrapper), its step is Flower's, unchanged.
"""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy


class AverageOf(FedAvg):
    average: Strategy   # set by the server optimizer's constructor (fedavgm.py, fedadam.py, fedyogi.py)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.average.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        return self.average.aggregate_train(server_round, replies)
