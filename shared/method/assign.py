"""group.constraint_form=assign: each user's expert, on the user's own client (IFCA-style hard
assignment by loss), and the probe items it is measured on (group.assign_probe).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import torch
import torch.nn.functional as F

from shared.data.canaries import is_canary
from shared.data.encode import encode_users, make_batches, placed
from shared.method.losses import answer_logits
from shared.method.model import ProperModel
from shared.runtime.precision import autocast


@torch.no_grad()
def expert_losses(model: ProperModel, tokenizer, users, cfg) -> torch.Tensor:
    """[U, k]: each user's mean answer loss over its history with every layer routed to expert e
    alone (the group part loaded in `model`). Forward passes only: k thirds of a training pass."""
    items = encode_users(tokenizer, users, cfg.max_len)
    n_layers, k = len(model.layer_names), model.k
    dev = model.device
    total, count = torch.zeros(len(users), k, device=dev), torch.zeros(len(users), device=dev)
    model.set_stage("group")
    for e in range(k):
        with model.fixed_mixture(F.one_hot(torch.full((n_layers,), e, device=dev), k).float()):
            for batch in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, None):
                ids, mask, labels, uidx = placed(batch, dev)
                with autocast(cfg, dev.type):
                    logits, target, rows = answer_logits(model.lm, ids, mask, labels)
                token = F.cross_entropy(logits.float(), target, reduction="none")   # answer_loss, per token
                total[:, e].index_add_(0, uidx, torch.zeros(len(ids), device=dev).index_add_(0, rows, token))
                if e == 0:
                    ones = torch.zeros(len(ids), device=dev).index_add_(0, rows, torch.ones_like(token))
                    count.index_add_(0, uidx, ones)
    return (total / count.clamp_min(1).view(-1, 1)).cpu()


def assign_experts(model: ProperModel, tokenizer, users, cfg, seed: int,
                   start: torch.Tensor | None = None, fixed: bool = False) -> torch.Tensor:
    """[U] each user's expert for group.constraint_form=assign, on the user's own client: the expert
    that fits its history best (IFCA, Ghosh et al. 2020: hard assignment by loss, re-estimated every
    round). While the experts cannot differ (every expert B is 0: the stage's start) the losses tie,
    and the user takes `start` [U] where one is given (a clustering of the users), else draws its
    expert from a hash of (seed, user id): a random, roughly balanced start, the same wherever the
    user is trained. fixed (group.reassign=false): the start (or the hash) is kept whatever the
    experts, for the whole stage."""
    if fixed or all(not layer.expert_B.any() for _, layer in model.layers()):
        if start is not None:
            return start.long().clone()
        return torch.tensor([int(hashlib.sha256(f"{seed}:{u.user_id}".encode()).hexdigest()[:8], 16) % model.k
                             for u in users])
    return expert_losses(model, tokenizer, users, cfg).argmin(1)


def split_probe(users, n: int, seed: int):
    """(fit, probe): the same users, each with n of its training items moved out of `fit` into
    `probe` (group.assign_probe). The assignment is measured on the probe items, which the group stage
    never trains on, because on its own training items the expert a user was assigned has memorised
    them and wins again whatever the user's group: the assignment would stick to its random start.
    A user with n items or fewer keeps them all in both. The items are a seeded draw per user among
    its own items: a canary copy (privacy.canaries) is never a probe, so it trains as it would without."""
    fit, probe = [], []
    for u in users:
        items = list(u.train)
        own = [i for i, x in enumerate(items) if not is_canary(x)]
        if n <= 0 or len(own) <= n:
            fit.append(u)
            probe.append(u)
            continue
        rng = random.Random(int(hashlib.sha256(f"{seed}:{u.user_id}:probe".encode()).hexdigest()[:8], 16))
        held = set(rng.sample(own, n))
        fit.append(replace(u, train=[x for i, x in enumerate(items) if i not in held]))
        probe.append(replace(u, train=[x for i, x in enumerate(items) if i in held]))
    return fit, probe
