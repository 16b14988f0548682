"""privacy.dp: client-level differential privacy of the population and group stages, on Flower's own
DifferentialPrivacyServerSideFixedClipping / DifferentialPrivacyClientSideFixedClipping.

Flower's wrappers take a strategy whole: clip the replies (or let the clients clip them,
client/privacy.py), call the strategy's aggregate_train, add Gaussian noise of std
z * C / (updates averaged) to what it returns. Wrapped around the strategies this project builds
(server/strategies/__init__.py: a server optimizer on top of the average), the noise would land on the
server optimizer's output: FedAdam divides the averaged update by its running RMS, so its output moves
by more than C / n when one client's update changes, and its moments (FedAvgM's momentum) would keep
the un-noised averages for later rounds. So the wrapper sits *inside* the strategy, between the
average and the server step: the server optimizer steps on PrivateAverage (average_of.py), which
hands configure_train / aggregate_train to Flower's wrapper, whose inner strategy is the stage's
plain average (through HeldRecords, held_records.py). The server step then reads the noised
average: post-processing, at no privacy cost.

What PrivateAverage adds around Flower's wrapper:
- every reply weighs the same (the strategy's weighted_by_key is DP_WEIGHT, set to 1 here on the
  received replies): a weighted average moves by (the reply's weight share) * C when one reply
  changes, and a share that depends on the data (examples, routing mass) is not bounded by 1 / n;
- num_sampled_clients is the number of replies averaged, each round, so the noise std is exactly
  z * C / (the average's denominator) whether or not every sampled client answered;
- under federation.sampling=poisson the denominator is fixed instead: m = q N, the expected number
  of clients (`expected`, set by the round), as the subsampled Gaussian's analysis needs (McMahan et
  al., 2018, the fixed-denominator estimator): with the realised count n in the denominator, adding
  a user would also rescale every other update by n / (n + 1), which the sensitivity C / m does not
  cover. Flower's wrapper averages the n clipped updates and adds noise of std z C / n; the noised
  update (average minus the round's start) is then scaled by n / m: start + (sum + N(0, (z C)^2)) / m,
  exactly the sum over m with noise of std z C / m (docs/decisions.md "Privacy");
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
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from server.strategies.held_records import DP_WEIGHT, HeldRecords
from server.strategies.metrics import mean_scalar_metrics
from server.strategies.wrapper import Wrapper
from shared.runtime import protocol as P


def dp_metrics(contents, _weight_key) -> MetricRecord:
    """Training metrics under DP: still the examples-weighted means (they are not part of the
    private release, docs/decisions.md "Privacy")."""
    out = mean_scalar_metrics(contents, P.NUM_EXAMPLES)
    if DP_WEIGHT in out:
        del out[DP_WEIGHT]
    return out


class PrivateAverage(Wrapper):
    """`average` under Flower's DP wrapper for privacy.dp (`dp`: its settings); `updates` is the
    number of clipped updates the last round averaged (for the accountant, server/privacy.py)."""

    def __init__(self, average: Strategy, dp, stage: str):
        wrapper = (DifferentialPrivacyClientSideFixedClipping if dp.clipping == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
        self.held: dict[int, dict] = {}   # a reply's routing statistics, held aside while Flower clips
        super().__init__(wrapper(HeldRecords(average, self.held), float(dp.noise_multiplier), float(dp.clip), 1))
        self.stage, self.noise_seed = stage, dp.seed
        self.sent_order: list[str] = []
        self.start: ArrayRecord | None = None
        self.updates = 0
        self.expected: int | None = None   # poisson sampling: the fixed denominator m (set per round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if not len(arrays):
            raise RuntimeError(f"{self.stage}:{server_round}: DP clips updates against the round's start, "
                               "and the server has none (query.init)")
        self.sent_order = list(arrays.keys())
        self.start = in_order(arrays, sorted(self.sent_order))
        return self.inner.configure_train(server_round, self.start, config, grid)

    def aggregate_train(self, server_round: int, replies):
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None, None
        self.held.clear()
        for r in ok:
            r.content[P.METRICS][DP_WEIGHT] = 1.0
            self.held[id(r)] = {n: rec for n, rec in r.content.array_records.items() if n != P.ARRAYS}
            for name in self.held[id(r)]:
                del r.content[name]
            r.content[P.ARRAYS] = in_order(r.content[P.ARRAYS], sorted(self.sent_order))
        self.inner.num_sampled_clients = self.updates = len(ok)
        with seeded_noise(self.noise_seed, self.stage, server_round):
            arrays, metrics = self.inner.aggregate_train(server_round, ok)
        if arrays is not None and self.expected:
            arrays = rescaled(arrays, self.start, len(ok) / float(self.expected))
        return (None if arrays is None else in_order(arrays, self.sent_order)), metrics


def rescaled(arrays: ArrayRecord, start: ArrayRecord, factor: float) -> ArrayRecord:
    """start + factor * (arrays - start), array by array, in the arrays' dtype."""
    out = {}
    for key in arrays.keys():
        a, s = arrays[key].numpy(), start[key].numpy()
        out[key] = Array(np.asarray(s.astype(np.float64) + factor * (a.astype(np.float64) - s), dtype=a.dtype))
    return ArrayRecord(out)


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
