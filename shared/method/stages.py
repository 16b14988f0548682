"""PROPER's three stages, trained locally on a set of users: what a client (or `proper local`) runs.

  train_population  next-token CE on the outputs over every user's history -> population LoRA
  train_group       experts + user-aware router + the users' embeddings, with the constraint loss
  train_user        per user: user LoRA + LoRA-aware router, from that user's stage-2 model

Shared parameters come back as {name: tensor}; private state (embeddings, user LoRAs, LoRA-aware
routers) goes to the caller's UserStore and never into the returned result. The losses are in
shared/method/losses.py, the assignment of group.constraint_form=assign in shared/method/assign.py.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch

from shared.data.encode import encode_example, encode_users, make_batches, n_batches, placed
from shared.method.assign import assign_experts, expert_losses, split_probe
from shared.method.losses import (
    answer_logits,
    answer_loss,
    assignment_loss,
    balance_loss,
    constraint_loss,
    lm_loss,
    user_mixtures,
)
from shared.method.model import ProperModel
from shared.method.optim import make_optimizer, warmup
from shared.runtime.precision import autocast
from shared.runtime.progress import Progress

# the losses and the assignment are imported from here too (their home before the split)
__all__ = ["RoundResult", "optimizer_step", "train_population", "train_group", "initial_mixtures", "mixtures_by_user",
           "train_user", "lm_loss", "answer_loss", "answer_logits", "user_mixtures", "constraint_loss", "balance_loss",
           "assignment_loss", "expert_losses", "assign_experts", "split_probe"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- results
@dataclass
class RoundResult:
    num_examples: int
    metrics: dict[str, float]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)   # population or group part
    routing_mass: torch.Tensor | None = None                          # [L, k] tokens routed per expert
    mixtures: torch.Tensor | None = None                              # [U, L, k], no ids, shuffled


def optimizer_step(opt, loss: torch.Tensor, params, cfg):
    warmup(opt, int(cfg.warmup_steps))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()


# ---------------------------------------------------------------- stage 1: population
def train_population(model: ProperModel, tokenizer, users, cfg, seed: int = 0) -> RoundResult:
    """Train the population LoRA (already loaded into `model`) on these users' histories."""
    model.set_stage("population", train=True)
    items = encode_users(tokenizer, users, cfg.max_len)
    opt = make_optimizer(model.trainable_parameters(), cfg)
    rng = random.Random(seed)
    losses, tokens, t0 = [], 0, time.time()
    progress = Progress("population", cfg.epochs * n_batches(items, cfg.batch_size))
    for _ in range(cfg.epochs):
        for batch in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            ids, mask, labels, _ = placed(batch, model.device)
            with autocast(cfg, model.device.type):
                loss = answer_loss(model.lm, ids, mask, labels)
            optimizer_step(opt, loss, model.trainable_parameters(), cfg)
            losses.append(loss.item())
            tokens += int(mask.sum())
            progress.tick(losses[-1], tokens)
    model.set_stage("population")
    return RoundResult(len(items), _train_metrics(losses, tokens, t0), model.part_state("population"))


def _train_metrics(losses, tokens, t0):
    dt = max(time.time() - t0, 1e-9)
    return {"train_loss": float(sum(losses[-10:]) / max(1, len(losses[-10:]))) if losses else math.nan,
            "train_tokens": float(tokens), "train_seconds": dt, "tokens_per_s": tokens / dt}


# ---------------------------------------------------------------- stage 2: group
def train_group(model: ProperModel, tokenizer, users, embeddings: torch.Tensor, cfg,
                others: torch.Tensor | None = None, seed: int = 0,
                user_router: bool = True, return_user_mixtures: bool = False,
                assignment: torch.Tensor | None = None):
    """Train experts, W_h, W_u (shared) and the users' embeddings (private) for one round.

    embeddings: [U, d] e_u of `users` (updated copy returned); others: previous-round mixtures
    of other users, shuffled and without ids, for the constraint loss. user_router=False is the
    LoRAMoE baseline: tokens alone route, e_u is unused and there is no constraint loss.
    Returns the round result (shared part, routing mass, this round's mixtures) and the new e_u;
    with return_user_mixtures, also each user's mixture [U, L, k] in `users` order (NaN rows for a
    user with no tokens). That one names users by position: it is for the caller's own disk
    (group recovery studies) and must never go into a reply, unlike the result's shuffled mixtures.
    assignment: [U] each user's expert (assign_experts), the target of constraint_form=assign.
    """
    if not model.merged:
        raise RuntimeError("group stage needs the population LoRA merged into the backbone (W_p)")
    model.set_stage("group", train=True)
    dev = model.device   # the client's (client/model.py); what the round returns goes back to the CPU
    emb = torch.nn.Parameter(embeddings.detach().clone().float().to(dev))
    others = None if others is None else others.to(dev)
    assignment = None if assignment is None else assignment.to(dev)
    items = encode_users(tokenizer, users, cfg.max_len)
    params = model.trainable_parameters() + ([emb] if user_router else [])
    opt = make_optimizer(group_param_groups(model, emb, user_router, cfg), cfg)
    lam = float(cfg.constraint_weight) if user_router else 0.0
    form = cfg.constraint_form
    if form == "assign" and user_router and assignment is None:
        raise ValueError("group.constraint_form=assign needs each user's assigned expert (assign_experts)")
    rng = random.Random(seed)
    n_layers = len(model.layer_names)
    mass = torch.zeros(n_layers, model.k, device=dev)
    mix_sum = torch.zeros(len(users), n_layers, model.k, device=dev)
    mix_tok = torch.zeros(len(users), device=dev)
    losses, cons, tokens, t0 = [], [], 0, time.time()
    progress = Progress("group", cfg.epochs * n_batches(items, cfg.batch_size))
    for epoch in range(cfg.epochs):
        last = epoch == cfg.epochs - 1
        for batch in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            ids, mask, labels, uidx = placed(batch, model.device)
            with autocast(cfg, dev.type), model.users(emb[uidx] if user_router else None, record=True) as ctx:
                lm = answer_loss(model.lm, ids, mask, labels)
            p, uniq, ntok = user_mixtures(ctx.betas, mask, uidx)
            if form == "assign" and user_router:
                con = assignment_loss(p, assignment[uniq])
            else:
                con = balance_loss(p, others) if form == "balance" else constraint_loss(p, others)
            optimizer_step(opt, lm + lam * con, params, cfg)
            losses.append(lm.item())
            cons.append(con.item())
            tokens += int(mask.sum())
            progress.tick(losses[-1], tokens)
            if last:  # statistics of the final epoch: what the server aggregates and shares
                with torch.no_grad():
                    pd = p.detach().float()
                    mix_sum.index_add_(0, uniq, pd * ntok.view(-1, 1, 1).float())
                    mix_tok.index_add_(0, uniq, ntok.float())
                    mass += (pd * ntok.view(-1, 1, 1).float()).sum(0)
            ctx.betas.clear()
    model.set_stage("group")
    mass, mix_sum, mix_tok = mass.cpu(), mix_sum.cpu(), mix_tok.cpu()
    by_user = mix_sum / mix_tok.view(-1, 1, 1)  # 0 / 0 = NaN for a user with no tokens
    seen = mix_tok > 0
    mixtures = by_user[seen][torch.randperm(int(seen.sum()), generator=torch.Generator().manual_seed(seed))]
    metrics = _train_metrics(losses, tokens, t0)
    metrics["constraint_loss"] = float(sum(cons[-10:]) / max(1, len(cons[-10:]))) if cons else math.nan
    result = RoundResult(len(items), metrics, model.part_state("group"), mass, mixtures)
    if return_user_mixtures:
        return result, emb.detach().clone().cpu(), by_user
    return result, emb.detach().clone().cpu()


def group_param_groups(model: ProperModel, emb: torch.Tensor, user_router: bool, cfg) -> list[dict]:
    """The group stage's optimizer groups: the user part of the user-aware router (W_u of every layer)
    and the users' e_u at group.user_lr_scale x lr, the rest at lr. Why a separate rate: a user's
    e_u is stepped only in the batches holding that user's items (a few per epoch), and the mixtures
    stay near uniform when W_u e_u cannot outgrow the token part (docs/decisions.md)."""
    scale = float(cfg.user_lr_scale)
    if scale == 1.0:  # one group, in the order the stage always used
        return [{"params": model.trainable_parameters() + ([emb] if user_router else [])}]
    user_part = list({id(layer.router_u): layer.router_u for _, layer in model.layers()}.values())  # tied: once
    user_part += [emb] if user_router else []
    ids = {id(p) for p in user_part}
    rest = [p for p in model.trainable_parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": user_part, "lr": float(cfg.lr) * scale}]


def initial_mixtures(model: ProperModel, tokenizer, users, embeddings: torch.Tensor, cfg, seed: int = 0):
    """The users' mixtures p_u under the group part loaded in `model` (no training): what a client
    sends before the first group round so that round's constraint loss has others to push from
    (group.initial_pool). Forward passes only: about a third of a training pass's compute."""
    by_user, seen = mixtures_by_user(model, tokenizer, users, embeddings, cfg)
    mixtures = by_user[seen]
    return mixtures[torch.randperm(len(mixtures), generator=torch.Generator().manual_seed(seed))]


def mixtures_by_user(model: ProperModel, tokenizer, users, embeddings: torch.Tensor, cfg):
    """([U, L, k] each user's mixture per layer, in `users` order; [U] which users had tokens), under
    the group part loaded in `model`, without training. Names users by position: for the caller's
    own disk or analysis, never for a reply."""
    if not model.merged:
        raise RuntimeError("group stage needs the population LoRA merged into the backbone (W_p)")
    model.set_stage("group")
    items = encode_users(tokenizer, users, cfg.max_len)
    n_layers = len(model.layer_names)
    dev = model.device
    mix_sum = torch.zeros(len(users), n_layers, model.k, device=dev)
    mix_tok = torch.zeros(len(users), device=dev)
    emb = embeddings.detach().float().to(dev)
    with torch.no_grad():
        for batch in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, None):
            ids, mask, _, uidx = placed(batch, model.device)
            with autocast(cfg, dev.type), model.users(emb[uidx], record=True) as ctx:
                model.lm.base_model(input_ids=ids, attention_mask=mask)
            p, uniq, ntok = user_mixtures(ctx.betas, mask, uidx)
            mix_sum.index_add_(0, uniq, p.float() * ntok.view(-1, 1, 1).float())
            mix_tok.index_add_(0, uniq, ntok.float())
            ctx.betas.clear()
    seen = mix_tok > 0
    return (mix_sum / mix_tok.clamp(min=1).view(-1, 1, 1)).cpu(), seen.cpu()


# ---------------------------------------------------------------- stage 3: user
def train_user(model: ProperModel, tokenizer, user, embedding: torch.Tensor, cfg, seed: int = 0) -> dict:
    """Train one user's LoRA + LoRA-aware router (the model's user part) from its stage-2 model."""
    model.reset_part("user", seed=seed)
    model.set_stage("user", train=True)
    items = [encode_example(tokenizer, ex, 0, cfg.max_len) for ex in user.train]
    opt = make_optimizer(model.trainable_parameters(), cfg)
    rng = random.Random(seed)
    e = embedding.detach().float().view(1, -1).to(model.device)
    losses, tokens, t0 = [], 0, time.time()
    for _ in range(cfg.epochs):
        for batch in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            ids, mask, labels, _ = placed(batch, model.device)
            with autocast(cfg, model.device.type), model.users(e.expand(len(ids), -1)):
                loss = answer_loss(model.lm, ids, mask, labels)
            optimizer_step(opt, loss, model.trainable_parameters(), cfg)
            losses.append(loss.item())
            tokens += int(mask.sum())
    model.set_stage("user")
    m = _train_metrics(losses, tokens, t0)
    m["num_examples"] = float(len(items))
    return m
