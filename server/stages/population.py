"""Stage 1 on the server: the population LoRA, averaged by examples (Flower's FedAvg) and stepped by
the server optimizer (server/strategies/). The shared part: PartState("population")."""
from __future__ import annotations

from server.stages.round import SharedRound
from server.strategies import average_settings
from server.strategies.robust import population_average


class PopulationStage(SharedRound):
    name = "population"

    def make_average(self):
        return population_average(self.cfg.federation, **average_settings(self.cfg))
