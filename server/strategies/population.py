"""Stage 1 on Flower's own strategies: only the message type differs (train.population), so the
population LoRA is averaged by "num-examples" and stepped by FedAvg/FedAvgM/FedAdam/FedYogi as
Flower writes them."""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.runtime import protocol as P


class PopulationAverage(FedAvg):
    """FedAvg with the population stage's message type."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for m in messages:
            m.metadata.message_type = P.TRAIN_POPULATION
        return messages
