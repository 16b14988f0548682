"""Flower's FedAvgM stepping on another strategy's average (average_of.py)."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM, Strategy

from server.strategies.average_of import AverageOf


class ServerFedAvgM(FedAvgM, AverageOf):
    """FedAvgM's server step (momentum_vector kept across a stage's rounds) after `average`'s aggregate."""

    def __init__(self, average: Strategy, **kwargs):
        super().__init__(**kwargs)
        self.average = average
