"""PROPER's three stages, trained locally on a set of users: what a client (or `proper local`) runs.

  train_population  next-token CE on the outputs over every user's history -> population LoRA
  train_group       experts + user-aware router + the users' embeddings, with the constraint loss
  train_user        per user: user LoRA + LoRA-aware router, from that user's stage-2 model

Shared parameters come back as {name: tensor}; private state (embeddings, user LoRAs, LoRA-aware
routers) goes to the caller's UserStore and never into the returned result.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from shared.data.canaries import is_canary
from shared.data.encode import encode_example, encode_users, make_batches, n_batches
from shared.method.model import ProperModel
from shared.method.optim import make_optimizer, warmup
from shared.runtime.precision import autocast
from shared.runtime.progress import Progress

log = logging.getLogger(__name__)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def answer_loss(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lm_loss, computing the vocabulary projection only where there is a label.

    Only the few answer tokens of each example are learned, yet a full forward projects every
    position onto the vocabulary (49k x 576 for SmolLM2: ~40 % of the FLOPs and a [B, T, V]
    tensor); projecting the answer positions alone gives the same loss for a fraction of the cost.
    """
    logits, target, _ = answer_logits(lm, ids, mask, labels)
    return F.cross_entropy(logits.float(), target)


def answer_logits(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """(logits [N, V] at the N answer positions, their targets [N], which row each came from [N])."""
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    return lm.get_output_embeddings()(hidden[:, :-1][keep]), target[keep], keep.nonzero()[:, 0]


# ---------------------------------------------------------------- the constraint loss
def user_mixtures(betas: list[torch.Tensor], mask: torch.Tensor, users: torch.Tensor):
    """Per-user mean routing weights p_u: ([U, L, k], the users' indices, tokens per user).

    betas: one [B, T, k] tensor per layer; mask: [B, T] real tokens.
    """
    m = mask.to(betas[0].dtype).unsqueeze(-1)                      # [B, T, 1]
    sums = torch.stack([(b * m).sum(1) for b in betas], dim=1)    # [B, L, k] token sums per row
    uniq, inv = torch.unique(users, return_inverse=True)
    per_user = torch.zeros(len(uniq), *sums.shape[1:], dtype=sums.dtype).index_add(0, inv, sums)
    tokens = torch.zeros(len(uniq), dtype=sums.dtype).index_add(0, inv, mask.sum(1).to(sums.dtype))
    return per_user / tokens.view(-1, 1, 1), uniq, tokens


def constraint_loss(p: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over pairs of different users' mixtures (flattened over layers).

    p: [U, L, k] mixtures of the users in this batch (with gradients);
    others: [V, L, k] mixtures of other users from the previous round (constants), or None.
    Minimising it pushes users' mixtures apart, which keeps the experts from collapsing.
    """
    a = F.normalize(p.flatten(1), dim=-1)
    sims = []
    if len(a) > 1:
        s = a @ a.T
        off = ~torch.eye(len(a), dtype=torch.bool)
        sims.append(s[off])
    if others is not None and len(others):
        b = F.normalize(others.flatten(1).to(a.dtype), dim=-1)
        sims.append((a @ b.T).flatten())
    if not sims:
        return p.sum() * 0.0
    return torch.cat(sims).mean()


def balance_loss(p: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """The constraint on groups rather than on pairs (group.constraint_form=balance), per layer and
    averaged over layers, in units of log k:
        mean_u H(p_u) - H(mean_u p_u)
    the negative mutual information between user and expert: low when each user routes to few
    experts and the experts are evenly used. Unlike the pairwise cosine it does not push two users
    of one group apart: they may share experts as long as the users as a whole spread over them.

    p: [U, L, k] this batch's users' mixtures (with gradients); others: [V, L, k] other users'
    mixtures (constants) that join the marginal, so a one-user client still sees how the experts
    are used by everyone else."""
    k = p.shape[-1]
    q = p.float()
    marginal = q if others is None or not len(others) else torch.cat([q, others.to(q)])
    own = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()                       # mean over users, layers
    mean = marginal.mean(0)                                                     # [L, k]
    spread = -(mean * mean.clamp_min(1e-12).log()).sum(-1).mean()              # mean over layers
    return (own - spread) / math.log(k)


def assignment_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """group.constraint_form=assign: the cross-entropy from each user's mixture, in every layer, to
    its assigned expert (target [U], from assign_experts): mean over users and layers of
    -log p_u[l, target_u]."""
    picked = p.float().gather(-1, target.view(-1, 1, 1).expand(-1, p.shape[1], 1))
    return -picked.clamp_min(1e-12).log().mean()


@torch.no_grad()
def expert_losses(model: ProperModel, tokenizer, users, cfg) -> torch.Tensor:
    """[U, k]: each user's mean answer loss over its history with every layer routed to expert e
    alone (the group part loaded in `model`). Forward passes only: k thirds of a training pass."""
    items = encode_users(tokenizer, users, cfg.max_len)
    n_layers, k = len(model.layer_names), model.k
    total, count = torch.zeros(len(users), k), torch.zeros(len(users))
    model.set_stage("group")
    for e in range(k):
        with model.fixed_mixture(F.one_hot(torch.full((n_layers,), e), k).float()):
            for ids, mask, labels, uidx in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, None):
                with autocast(cfg):
                    logits, target, rows = answer_logits(model.lm, ids, mask, labels)
                token = F.cross_entropy(logits.float(), target, reduction="none")   # answer_loss, per token
                total[:, e].index_add_(0, uidx, torch.zeros(len(ids)).index_add_(0, rows, token))
                if e == 0:
                    count.index_add_(0, uidx, torch.zeros(len(ids)).index_add_(0, rows, torch.ones_like(token)))
    return total / count.clamp_min(1).view(-1, 1)


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


# ---------------------------------------------------------------- results
@dataclass
class RoundResult:
    num_examples: int
    metrics: dict[str, float]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)   # population or group part
    routing_mass: torch.Tensor | None = None                          # [L, k] tokens routed per expert
    mixtures: torch.Tensor | None = None                              # [U, L, k], no ids, shuffled


def optimizer_step(opt, loss: torch.Tensor, params, cfg):
    warmup(opt, int(cfg.get("warmup_steps", 0) or 0))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.get("grad_clip", 1.0))
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
        for ids, mask, labels, _ in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            with autocast(cfg):
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
    emb = torch.nn.Parameter(embeddings.detach().clone().float())
    items = encode_users(tokenizer, users, cfg.max_len)
    params = model.trainable_parameters() + ([emb] if user_router else [])
    opt = make_optimizer(_group_param_groups(model, emb, user_router, cfg), cfg)
    lam = float(cfg.get("constraint_weight", 0.1)) if user_router else 0.0
    form = cfg.get("constraint_form", "pairs")
    if form == "assign" and user_router and assignment is None:
        raise ValueError("group.constraint_form=assign needs each user's assigned expert (assign_experts)")
    rng = random.Random(seed)
    n_layers = len(model.layer_names)
    mass = torch.zeros(n_layers, model.k)
    mix_sum = torch.zeros(len(users), n_layers, model.k)
    mix_tok = torch.zeros(len(users))
    losses, cons, tokens, t0 = [], [], 0, time.time()
    progress = Progress("group", cfg.epochs * n_batches(items, cfg.batch_size))
    for epoch in range(cfg.epochs):
        last = epoch == cfg.epochs - 1
        for ids, mask, labels, uidx in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            with autocast(cfg), model.users(emb[uidx] if user_router else None, record=True) as ctx:
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
    by_user = mix_sum / mix_tok.view(-1, 1, 1)  # 0 / 0 = NaN for a user with no tokens
    seen = mix_tok > 0
    mixtures = by_user[seen][torch.randperm(int(seen.sum()), generator=torch.Generator().manual_seed(seed))]
    metrics = _train_metrics(losses, tokens, t0)
    metrics["constraint_loss"] = float(sum(cons[-10:]) / max(1, len(cons[-10:]))) if cons else math.nan
    result = RoundResult(len(items), metrics, model.part_state("group"), mass, mixtures)
    if return_user_mixtures:
        return result, emb.detach().clone(), by_user
    return result, emb.detach().clone()


def _group_param_groups(model: ProperModel, emb: torch.Tensor, user_router: bool, cfg) -> list[dict]:
    """The group stage's optimizer groups: the user part of the user-aware router (W_u of every layer)
    and the users' e_u at group.user_lr_scale x lr, the rest at lr. Why a separate rate: a user's
    e_u is stepped only in the batches holding that user's items (a few per epoch), and the mixtures
    stay near uniform when W_u e_u cannot outgrow the token part (docs/decisions.md)."""
    scale = float(cfg.get("user_lr_scale", 1.0))
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
    mix_sum = torch.zeros(len(users), n_layers, model.k)
    mix_tok = torch.zeros(len(users))
    emb = embeddings.detach().float()
    with torch.no_grad():
        for ids, mask, _, uidx in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, None):
            with autocast(cfg), model.users(emb[uidx], record=True) as ctx:
                model.lm.base_model(input_ids=ids, attention_mask=mask)
            p, uniq, ntok = user_mixtures(ctx.betas, mask, uidx)
            mix_sum.index_add_(0, uniq, p.float() * ntok.view(-1, 1, 1).float())
            mix_tok.index_add_(0, uniq, ntok.float())
            ctx.betas.clear()
    seen = mix_tok > 0
    return mix_sum / mix_tok.clamp(min=1).view(-1, 1, 1), seen


# ---------------------------------------------------------------- stage 3: user
def train_user(model: ProperModel, tokenizer, user, embedding: torch.Tensor, cfg, seed: int = 0) -> dict:
    """Train one user's LoRA + LoRA-aware router (the model's user part) from its stage-2 model."""
    model.reset_part("user", seed=seed)
    model.set_stage("user", train=True)
    items = [encode_example(tokenizer, ex, 0, cfg.max_len) for ex in user.train]
    opt = make_optimizer(model.trainable_parameters(), cfg)
    rng = random.Random(seed)
    e = embedding.detach().float().view(1, -1)
    losses, tokens, t0 = [], 0, time.time()
    for _ in range(cfg.epochs):
        for ids, mask, labels, _ in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            with autocast(cfg), model.users(e.expand(len(ids), -1)):
                loss = answer_loss(model.lm, ids, mask, labels)
            optimizer_step(opt, loss, model.trainable_parameters(), cfg)
            losses.append(loss.item())
            tokens += int(mask.sum())
    model.set_stage("user")
    m = _train_metrics(losses, tokens, t0)
    m["num_examples"] = float(len(items))
    return m
