"""Robust counterparts of the group stage's average (federation.aggregation; the population stage
uses Flower's own FedMedian, FedTrimmedAvg and Krum, server/strategies/robust.py).

The group part's experts are averaged by routing mass (aggregate.py): a client that never routed to
an expert leaves it out. The robust versions keep that: per coordinate, the clients' values are
sorted and the lowest and highest `beta` of the weight (the routing mass for an expert, one per
client for the routers) are cut away before the weighted mean; beta = 0.5 is the weighted median.
Krum keeps the one reply whose update is closest to its n - f - 2 nearest others (Blanchard et al.,
2017), as Flower's Krum does for the population LoRA.

Why the clip first: routing-mass weights let a client that holds most of an expert's mass (an
attacker alone on an expert, or one honest user with a group of its own) decide that expert under
any trimming. So, as FLAME does (Nguyen et al., 2022), every client's whole update is first clipped
to the step's median update norm: an expert can still follow the one client routed to it, but by no
more than an ordinary step.
"""
from __future__ import annotations

import torch


def weighted_trimmed_mean(values: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """values [C, ...], weights [C] (>= 0, not all 0): per coordinate, the mean of the values with the
    lowest and highest `beta` of the weight cut away; beta >= 0.5 gives the weighted median."""
    order = values.sort(0)
    shape = (-1,) + (1,) * (values.dim() - 1)
    w = weights.float().reshape(shape).expand_as(values).gather(0, order.indices)
    hi = w.cumsum(0)
    total = hi[-1:]
    if beta >= 0.5:   # the first value whose weight reaches half of the total
        pick = (hi >= total / 2).float().argmax(0, keepdim=True)
        return order.values.gather(0, pick)[0]
    lo = hi - w
    keep = (torch.minimum(hi, (1 - beta) * total) - torch.maximum(lo, beta * total)).clamp_min(0)
    return (order.values * keep).sum(0) / keep.sum(0).clamp_min(1e-30)


def clip_to_median(states: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor]
                   ) -> list[dict[str, torch.Tensor]]:
    """Each state's update (state - start, over all its tensors) scaled down to at most the median
    update norm of the states; an update at or under the median is kept as it is."""
    deltas = [{k: s[k].float() - start[k].float() for k in s} for s in states]
    norms = torch.stack([torch.sqrt(sum((d ** 2).sum() for d in dl.values())) for dl in deltas])
    bound = norms.median()   # the lower middle for an even count: never an outlier's
    out = []
    for dl, n in zip(deltas, norms):
        scale = 1.0 if n <= bound else float(bound / n)
        out.append({k: start[k].float() + scale * d for k, d in dl.items()})
    return out


def robust_group(states: list[dict[str, torch.Tensor]], masses: list[torch.Tensor], layer_names: list[str],
                 beta: float, start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The group part from the clients' parts: experts by the routing mass sent to them (an expert no
    client routed to: every client alike), routers alike for every client, each trimmed by `beta`.
    start: the group part the clients started from; given, every update is first clipped to the
    median update norm (module doc)."""
    if start is not None:
        states = clip_to_median(states, start)
    ones = torch.ones(len(states))
    out = {k: weighted_trimmed_mean(torch.stack([s[k].float() for s in states]), ones, beta) for k in states[0]}
    mass = torch.stack([m.float() for m in masses])                # [C, L, k]
    for li, name in enumerate(layer_names):
        for pname in ("expert_A", "expert_B"):
            key = f"{name}.{pname}"
            stacked = torch.stack([s[key].float() for s in states])   # [C, k, ...]
            for e in range(stacked.shape[1]):
                w = mass[:, li, e]
                if float(w.sum()) > 0:
                    out[key][e] = weighted_trimmed_mean(stacked[:, e], w, beta)
    return out


def krum_choice(states: list[dict[str, torch.Tensor]], faulty: int) -> int:
    """The index of the state with the lowest Krum score: the summed squared distance to its
    n - faulty - 2 nearest others (at least 1)."""
    flat = torch.stack([torch.cat([s[k].float().flatten() for k in sorted(s)]) for s in states])
    if len(states) < 3:
        return 0
    dist = torch.cdist(flat.double(), flat.double()) ** 2
    near = max(1, len(states) - faulty - 2)
    scores = dist.sort(1).values[:, 1:near + 1].sum(1)   # column 0: the distance to itself
    return int(scores.argmin())
