"""The client optimizer and its learning rate across a stage's rounds (train.optimizer, lr_schedule,
warmup_steps).

Why this matters in a federation: a client builds a fresh optimizer every round, and a
cross-device client holds one user's ~8 items, so a round is a few local steps. A fresh AdamW's
first steps are about lr * sign(g) whatever the gradient's size; SGD's are proportional to it, which
is what FedAvg's analysis (and a server optimizer reading the averaged update as a pseudo-gradient)
assumes. Both are offered; docs/results/federated.md measures them.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(params, cfg, lr: float | None = None) -> torch.optim.Optimizer:
    lr = float(cfg.lr if lr is None else lr)
    name = str(cfg.optimizer)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.weight_decay))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay))
    raise ValueError(f"train.optimizer: expected one of {OPTIMIZERS}, got {name!r}")


def warmup(opt: torch.optim.Optimizer, steps: int):
    """Before the optimizer's next step: its first `steps` steps take lr * step / steps (each param
    group's own lr), then the lr itself. Why: a client's optimizer is fresh every round, and a fresh
    AdamW's first steps are about lr * sign(g) on every parameter at once; at a high lr the group
    stage's first round diverged (docs/decisions.md, "The group stage's learning rate")."""
    if steps <= 0:
        return
    for group in opt.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group["warm_step"] = group.get("warm_step", 0) + 1
        group["lr"] = group["peak_lr"] * min(1.0, group["warm_step"] / steps)


def round_lr(cfg, server_round: int) -> float:
    """The client lr of a stage's round `server_round` (1-based) of cfg.rounds: constant, or a cosine
    from lr down to lr_min_ratio * lr at the last round (one round: lr)."""
    lr = float(cfg.lr)
    schedule = str(cfg.lr_schedule)
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule: expected one of {LR_SCHEDULES}, got {schedule!r}")
    rounds = int(cfg.rounds or 1)
    if rounds <= 1:
        return lr
    floor = lr * float(cfg.lr_min_ratio)
    t = (min(max(server_round, 1), rounds) - 1) / (rounds - 1)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
