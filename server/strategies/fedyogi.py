"""Flower's FedYogi stepping on another strategy's average (average_of.py)."""
from __future__ import annotations

from flwr.serverapp.strategy import FedYogi, Strategy

from server.strategies.average_of import AverageOf


class ServerFedYogi(FedYogi, AverageOf):
    """FedYogi's server step (m_t, v_t kept across a stage's rounds) after `average`'s aggregate."""

    def __init__(self, average: Strategy, **kwargs):
        super().__init__(**kwargs)
        self.average = average
