"""privacy.dp: client-level differential privacy of the population and group stages, on Flower's own
DifferentialPrivacyServerSideFixedClipping / DifferentialPrivacyClientSideFixedClipping.

Flower's wrappers take a strategy whole: clip the replies (or let the clients clip them,
client/privacy.py), call the strategy's aggregate_train, add Gaussian noise of std
z * C / (updates averaged) to what it returns. Wrapped around the strategies this project builds
(server/strategies/__init__.py: a server optimizer on top of the average), the noise would land on the
server optimizer's output: FedAdam divides the averaged update by its running RMS, so its output moves
by more than C / n when one client's update changes, and its moments (FedAvgM's momentum) would keep
the un-noised averages for later rounds. So the wrapper sits *inside* the strategy, between the
average and the server step: DPAverage comes after FedAvgM / FedOpt in the method order (where the
group mixin sits) and hands configure_train / aggregate_train to Flower's wrapper, whose inner
strategy (_Rest) is the rest of the method order, the plain average. The server step then reads the
noised average: post-processing, at no privacy cost.

What DPAverage adds around Flower's wrapper:
- every reply weighs the same (the strategy's weighted_by_key is DP_WEIGHT, set to 1 here on the
  received replies): a weighted average moves by (the reply's weight share) * C when one reply
  changes, and a share that depends on the data (examples, routing mass) is not bounded by 1 / n;
- num_sampled_clients is the number of replies averaged, each round, so the noise std is exactly
  z * C / (the average's denominator) whether or not every sampled client answered;
- a group reply also carries routing statistics (record "routing"): Flower's server-side clipping
  clips every ArrayRecord of a reply against the sent parameters, so they are held aside while it
  clips and put back for the group average (which under DP no longer weighs by them);
- the parameters in one order, their names' (Flower clips and draws the noise array by array, by
  position): the noise a seed gives each parameter does not depend on the order the checkpoint or
  a client lists them in; the average goes back to the server optimizer in the order it was given
  (FedAvgM steps by position);
- privacy.dp.seed seeds numpy's global generator, which Flower's noise draws from, per (seed, stage,
  round), so that a study or a test can repeat a run; null leaves it as numpy seeded it.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from server.strategies.population import mean_scalar_metrics
from shared.runtime import protocol as P

DP_WEIGHT = "dp-weight"   # the server's own weight key under DP (never on the wire): 1 per reply


def dp_settings(cfg):
    """privacy.dp when differential privacy is on (noise_multiplier set), else None."""
    dp = (cfg.get("privacy") or {}).get("dp") or {}
    return dp if dp.get("noise_multiplier") is not None else None


def dp_metrics(contents, _weight_key) -> MetricRecord:
    """Training metrics under DP: still the examples-weighted means (they are not part of the
    private release, docs/decisions.md "Privacy")."""
    out = mean_scalar_metrics(contents, P.NUM_EXAMPLES)
    if DP_WEIGHT in out:
        del out[DP_WEIGHT]
    return out


class _Rest:
    """The strategy Flower's wrapper wraps: the rest of the owner's method order after DPAverage."""

    def __init__(self, owner):
        self.owner = owner

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super(DPAverage, self.owner).configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        for r in replies:   # the routing statistics, held aside while Flower clipped
            for name, record in self.owner.held.pop(id(r), {}).items():
                r.content[name] = record
        arrays, metrics = super(DPAverage, self.owner).aggregate_train(server_round, replies)
        if metrics is not None and DP_WEIGHT in metrics:
            del metrics[DP_WEIGHT]
        return arrays, metrics


class DPAverage(FedAvg):
    dp = None                  # Flower's DP wrapper around _Rest(self); None: DP off, a plain pass-through
    stage: str = ""
    noise_seed: int | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.dp is None:
            return super().configure_train(server_round, arrays, config, grid)
        if not len(arrays):
            raise RuntimeError(f"{self.stage}:{server_round}: DP clips updates against the round's start, "
                               "and the server has none (query.init)")
        self.sent_order = list(arrays.keys())
        return self.dp.configure_train(server_round, in_order(arrays, sorted(self.sent_order)), config, grid)

    def aggregate_train(self, server_round: int, replies):
        if self.dp is None:
            return super().aggregate_train(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None, None
        self.held = {}
        for r in ok:
            r.content[P.METRICS][DP_WEIGHT] = 1.0
            self.held[id(r)] = {n: rec for n, rec in r.content.array_records.items() if n != P.ARRAYS}
            for name in self.held[id(r)]:
                del r.content[name]
            r.content[P.ARRAYS] = in_order(r.content[P.ARRAYS], sorted(self.sent_order))
        self.dp.num_sampled_clients = len(ok)
        with seeded_noise(self.noise_seed, self.stage, server_round):
            arrays, metrics = self.dp.aggregate_train(server_round, ok)
        return (None if arrays is None else in_order(arrays, self.sent_order)), metrics


def in_order(record: ArrayRecord, keys: list[str]) -> ArrayRecord:
    if set(record.keys()) != set(keys):
        raise ValueError(f"a reply's parameters differ from those sent: {sorted(set(record.keys()) ^ set(keys))[:4]}")
    return ArrayRecord({k: record[k] for k in keys})


@contextmanager
def seeded_noise(seed: int | None, stage: str, server_round: int):
    if seed is None:
        yield
        return
    saved = np.random.get_state()
    np.random.seed(int(hashlib.sha256(f"{seed}:{stage}:{server_round}".encode()).hexdigest()[:8], 16))
    try:
        yield
    finally:
        np.random.set_state(saved)


def add_privacy(strategy: DPAverage, cfg, stage: str) -> DPAverage:
    """Give a strategy whose method order holds DPAverage Flower's wrapper for privacy.dp."""
    dp = dp_settings(cfg)
    wrapper = (DifferentialPrivacyClientSideFixedClipping if dp.clipping == "client"
               else DifferentialPrivacyServerSideFixedClipping)
    strategy.dp = wrapper(_Rest(strategy), float(dp.noise_multiplier), float(dp.clip), 1)
    strategy.stage, strategy.noise_seed = stage, dp.get("seed")
    strategy.uniform_weights = True   # the group average's (server/strategies/group.py)
    return strategy

