"""Stage 2 on Flower's strategies, with one hook replaced: the average.

Messages also carry the final population LoRA (clients merge it: W_p) and a pool of other users'
mixtures, shuffled and without ids (the constraint loss pushes from them). Replies are averaged
with each expert weighted by the routing mass the clients sent to it, routers by examples
(shared/method/aggregate.py), and the pool for the next round is built from the replies' mixtures.
A server optimizer built over it (average_of.py) steps on this aggregate as on FedAvg's.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.strategies.metrics import mean_scalar_metrics
from shared.method.aggregate import aggregate_group
from shared.runtime import protocol as P

log = logging.getLogger("proper.server")


def mixture_pool(mixtures: list[torch.Tensor], seed: int) -> torch.Tensor:
    """User mixtures from many replies, pooled and shuffled with `seed` so that no order links
    them to clients: what the next round's clients get for the constraint loss. None where no reply
    carried any (privacy.mixtures=local)."""
    sent = [m for m in mixtures if len(m)]
    if not sent:
        return None
    pool = torch.cat(sent)
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]


def group_average(states: list[dict], routings: list[dict], examples: list[int]) -> dict[str, torch.Tensor]:
    layers = [k[: -len(".expert_A")] for k in states[0] if k.endswith(".expert_A")]
    return aggregate_group(states, [r["routing_mass"] for r in routings], examples, layers)


class GroupAverage(FedAvg):
    """population: the final population LoRA (sent with every message); pool: the shared mixtures,
    replaced by each aggregation (read it back as `pool`); seed: the run's, for the pool's shuffle;
    uniform_weights: privacy.dp, every reply weighs the same (privacy.py)."""

    def __init__(self, population: dict[str, torch.Tensor] | None, pool: torch.Tensor | None, seed: int,
                 uniform_weights: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.population, self.pool, self.seed = population, pool, seed
        self.uniform_weights = uniform_weights
        self.sent_keys: list[str] = []
        self.start: dict[str, torch.Tensor] | None = None   # the group part this round sent

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent_keys = list(arrays.keys())
        self.start = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        population = ArrayRecord(self.population) if self.population else ArrayRecord()
        others = ArrayRecord({"mixtures": self.pool}) if self.pool is not None else ArrayRecord()
        for m in messages:
            m.content[P.POPULATION] = population
            m.content[P.OTHERS] = others
            m.metadata.message_type = P.TRAIN_GROUP
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None, None
        contents = [r.content for r in ok]
        routings = [c[P.ROUTING].to_torch_state_dict() for c in contents]
        examples = [int(c[P.METRICS][P.NUM_EXAMPLES]) for c in contents]
        weights = routings
        if self.uniform_weights:  # a weighted average's sensitivity to one reply is its weight share
            weights = [{"routing_mass": torch.ones_like(r["routing_mass"])} for r in routings]
            examples = [1] * len(contents)
        agg = self.combine([c[P.ARRAYS].to_torch_state_dict() for c in contents], weights, examples)
        self.pool = mixture_pool([r["mixtures"] for r in routings], seed=self.seed * 7919 + server_round)
        # the key order of what was sent: FedAvgM zips the two as lists
        keys = [k for k in self.sent_keys if k in agg] or list(agg)
        return ArrayRecord({k: agg[k] for k in keys}), mean_scalar_metrics(contents, P.NUM_EXAMPLES)

    def combine(self, states: list[dict], routings: list[dict], examples: list[int]) -> dict[str, torch.Tensor]:
        """The hook a robust variant replaces (robust.py): the clients' group parts made one."""
        return group_average(states, routings, examples)
