"""Server-side aggregation of the shared parts (docs/decisions.md, "The federation").

population  FedAvg weighted by each client's number of training examples.
group       expert e of layer l: average weighted by the routing mass each client sent to that
            expert in that layer (the tokens it routed there), so a client that never used an
            expert does not drag it toward its untrained copy; routers W_h, W_u: FedAvg by
            examples. An expert no client routed to keeps the examples-weighted average.
"""
from __future__ import annotations

import torch


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("clients returned different parameter sets")
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)) for k in states[0]}


def aggregate_group(states: list[dict[str, torch.Tensor]], masses: list[torch.Tensor],
                    num_examples: list[int], layer_names: list[str]) -> dict[str, torch.Tensor]:
    """states: clients' group parts; masses: [L, k] routing mass per client (layer order =
    layer_names); num_examples: per client. Returns the aggregated group part."""
    out = weighted_average(states, num_examples)  # routers, and the fallback for unused experts
    mass = torch.stack([m.float() for m in masses])               # [C, L, k]
    total = mass.sum(0)                                            # [L, k]
    for li, name in enumerate(layer_names):
        used = total[li] > 0                                       # [k]
        w = mass[:, li] / total[li].clamp_min(1e-12)               # [C, k] per-expert client weights
        for pname in ("expert_A", "expert_B"):
            key = f"{name}.{pname}"
            stacked = torch.stack([s[key].float() for s in states])   # [C, k, ...]
            shape = (len(states), -1) + (1,) * (stacked.dim() - 2)
            by_mass = (stacked * w.reshape(shape)).sum(0)
            out[key] = torch.where(used.reshape((-1,) + (1,) * (stacked.dim() - 2)), by_mass, out[key])
    return out
