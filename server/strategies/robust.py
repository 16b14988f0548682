"""federation.aggregation: what replaces the mean of a round's replies, against broken and hostile
clients (docs/results/reliability.md). The server optimizer then steps on it as on the mean.

  mean          FedAvg (population: by examples; group: experts by routing mass, routers by examples)
  median        population: Flower's FedMedian; group: every update clipped to the step's median norm
                (FLAME), then the routing-mass weighted median
  trimmed_mean  population: Flower's FedTrimmedAvg(beta); group: clipped as for median, then the
                weighted mean with beta of the weight cut at each end, per coordinate
                (shared/method/robust.py)
  krum          population: Flower's Krum (num_malicious_nodes = federation.krum_faulty); group: the
                reply with the best Krum score
None of them reads the claimed num-examples, so weight cannot be bought there either.
"""
from __future__ import annotations

import torch
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from server.strategies.group import GroupAverage
from server.strategies.population import PopulationAverage
from shared.method.robust import krum_choice, robust_group


class PopulationMedian(PopulationAverage, FedMedian):
    """Flower's FedMedian with the population stage's message type."""


class PopulationTrimmedMean(PopulationAverage, FedTrimmedAvg):
    """Flower's FedTrimmedAvg with the population stage's message type."""


class PopulationKrum(PopulationAverage, Krum):
    """Flower's Krum with the population stage's message type."""


class RobustGroupAverage(GroupAverage):
    """The group average with its one hook, combine, made robust: trimmed (median at beta 0.5) or Krum."""

    def __init__(self, *args, how: str, beta: float, faulty: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.how, self.beta, self.faulty = how, beta, faulty

    def combine(self, states: list[dict], routings: list[dict], examples: list[int]) -> dict[str, torch.Tensor]:
        if self.how == "krum":
            return {k: v.float() for k, v in states[krum_choice(states, self.faulty)].items()}
        layers = [k[: -len(".expert_A")] for k in states[0] if k.endswith(".expert_A")]
        return robust_group(states, [r["routing_mass"] for r in routings], layers,
                            0.5 if self.how == "median" else self.beta, start=self.start)


def population_average(f, **kw) -> PopulationAverage:
    """The population stage's average for federation section `f`."""
    if f.aggregation == "median":
        return PopulationMedian(**kw)
    if f.aggregation == "trimmed_mean":
        return PopulationTrimmedMean(beta=float(f.trim_beta), **kw)
    if f.aggregation == "krum":
        return PopulationKrum(num_malicious_nodes=int(f.krum_faulty), **kw)
    return PopulationAverage(**kw)


def group_average(f, *args, **kw) -> GroupAverage:
    """The group stage's average for federation section `f`; args: GroupAverage's."""
    if f.aggregation == "mean":
        return GroupAverage(*args, **kw)
    return RobustGroupAverage(*args, how=str(f.aggregation), beta=float(f.trim_beta), faulty=int(f.krum_faulty), **kw)
