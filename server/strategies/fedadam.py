"""Flower's FedAdam stepping on another strategy's average (average_of.py)."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, Strategy

from server.strategies.average_of import AverageOf


class ServerFedAdam(FedAdam, AverageOf):
    """FedAdam's server step (m_t, v_t kept across a stage's rounds) after `average`'s aggregate."""

    def __init__(self, average: Strategy, **kwargs):
        super().__init__(**kwargs)
        self.average = average
