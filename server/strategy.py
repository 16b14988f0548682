"""Flower strategies for the two server-coordinated stages.

population  Flower's FedAvgM: the population LoRA averaged by "num-examples", then a server
            learning-rate step (population.server_lr, else federation.server_lr; 1 = plain FedAvg;
            no server momentum).
group       GroupFedAvg: FedAvg's sampling and message construction, but each message also
            carries the final population LoRA (clients build W_p from it) and the previous
            round's user mixtures, shuffled and without ids (for the constraint loss); replies are
            aggregated with experts weighted by routing mass and routers by examples
            (shared/method/aggregate.py), then the same server learning-rate step.

Why a server learning rate: a cross-device client holds one user's ~8 examples, so a round is a
couple of local steps per client, and the average of the clients' moves is far shorter than what
one pass over the same data does centrally (docs/decisions.md, "Server learning rate").
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM

from shared.method.aggregate import aggregate_group
from shared.runtime.config import SCHEDULES

log = logging.getLogger("proper.server")


def mean_scalar_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Examples-weighted mean of each scalar metric; lists (e.g. per-user scores) are skipped."""
    weights = [float(c["metrics"][weight_key]) for c in contents]
    total = sum(weights) or 1.0
    out = {}
    for key, value in contents[0]["metrics"].items():
        if isinstance(value, (int, float)) and key != weight_key:
            out[key] = sum(float(c["metrics"].get(key, 0.0)) * w for c, w in zip(contents, weights)) / total
    out[weight_key] = total
    return MetricRecord(out)


def server_lr(cfg, stage: str) -> float:
    """<stage>.server_lr if the stage sets one, else federation.server_lr (1 = plain FedAvg)."""
    own = cfg[stage].get("server_lr") if stage in cfg else None
    return float(own if own is not None else cfg.federation.get("server_lr", 1.0))


def server_step(start: dict[str, torch.Tensor], average: dict[str, torch.Tensor], lr: float):
    """start + lr * (average - start): FedAvgM's step without momentum (lr 1 = the average)."""
    return {k: start[k] + lr * (v - start[k]) for k, v in average.items()}


def mixture_pool(routings: list[dict], seed: int) -> torch.Tensor:
    """The user mixtures of a group round's replies, pooled and shuffled with `seed` so that no
    order links them to clients: what the next round's clients get for the constraint loss."""
    pool = torch.cat([r["mixtures"] for r in routings if len(r["mixtures"])])
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]


def group_aggregate(states: list[dict], routings: list[dict], examples: list[int], seed: int):
    """The group round's aggregate (experts by routing mass, routers by examples) and the pool of
    user mixtures for the next round."""
    layers = [k[: -len(".expert_A")] for k in states[0] if k.endswith(".expert_A")]
    agg = aggregate_group(states, [r["routing_mass"] for r in routings], examples, layers)
    return agg, mixture_pool(routings, seed)


def schedule(cfg) -> str:
    """federation.schedule: "parallel" (FedAvg: every node trains the same start, the server
    averages) or "sequential" (cyclic: each node trains what the one before it returned)."""
    value = str(cfg.federation.get("schedule", "parallel"))
    if value not in SCHEDULES:
        raise ValueError(f"federation.schedule: expected one of {SCHEDULES}, got {value!r}")
    return value


def visit_order(nodes: Iterable[int], seed: int, stage: str, server_round: int, fraction: float = 1.0) -> list[int]:
    """The nodes a sequential round visits, in a seeded order that changes every round (as a
    centralized epoch reshuffles its batches); fraction < 1 visits the first part of that order."""
    order = sorted(nodes)
    random.Random(f"{seed}:{stage}:{server_round}").shuffle(order)
    return order[:max(1, math.ceil(fraction * len(order)))] if order else []


def population_strategy(cfg) -> FedAvgM:
    return FedAvgM(fraction_train=float(cfg.federation.fraction_train), fraction_evaluate=0.0,
                   min_train_nodes=1, min_available_nodes=int(cfg.federation.min_available_clients),
                   weighted_by_key="num-examples", train_metrics_aggr_fn=mean_scalar_metrics,
                   server_learning_rate=server_lr(cfg, "population"), server_momentum=0.0)


class GroupFedAvg(FedAvg):
    def __init__(self, population: dict[str, torch.Tensor], mixtures: torch.Tensor | None, seed: int = 0,
                 server_learning_rate: float = 1.0, **kw):
        super().__init__(weighted_by_key="num-examples", fraction_evaluate=0.0,
                         train_metrics_aggr_fn=mean_scalar_metrics, **kw)
        self.population = ArrayRecord(population)
        self.mixtures = mixtures          # the pool shared with clients next round
        self.seed = seed
        self.server_learning_rate = server_learning_rate
        self.sent: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays.to_torch_state_dict() if len(arrays) else {}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        others = ArrayRecord({"mixtures": self.mixtures}) if self.mixtures is not None else ArrayRecord()
        for m in messages:
            m.content["population"] = self.population
            m.content["others"] = others
            m.metadata.message_type = "train.group"
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                log.warning("group round %d: node %s failed: %s", server_round, r.metadata.src_node_id,
                            r.error.reason.strip().splitlines()[-1][:200] if r.error.reason else r.error.code)
        if not ok:
            return None, None
        contents = [r.content for r in ok]
        agg, self.mixtures = group_aggregate([c["arrays"].to_torch_state_dict() for c in contents],
                                             [c["routing"].to_torch_state_dict() for c in contents],
                                             [int(c["metrics"]["num-examples"]) for c in contents],
                                             seed=self.seed * 7919 + server_round)
        if self.server_learning_rate != 1.0:
            if not self.sent:
                raise RuntimeError("a server learning rate needs the parameters the round started from")
            agg = server_step(self.sent, agg, self.server_learning_rate)
        return ArrayRecord(agg), mean_scalar_metrics(contents, "num-examples")
