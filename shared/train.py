"""Local training of one PROPER stage for a set of users: what a client (or `proper local`) runs.

  population_round  next-token CE on the outputs over every user's history -> population LoRA
  group_round       experts + user-aware router + the users' embeddings, with the constraint loss
  user_stage        per user: user LoRA + LoRA-aware router, from that user's stage-2 model

Shared parameters come back as {name: tensor}; private state (embeddings, user LoRAs, LoRA-aware
routers) goes to the caller's UserStore and never into the returned result.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shared.model import ProperModel

log = logging.getLogger(__name__)

ANSWER = "\nAnswer:"


# ---------------------------------------------------------------- tokenisation and batches
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]   # -100 on prompt tokens: only the output is learned
    user: int           # index of the user in the caller's user list


def encode_prompt(tokenizer, text: str, max_prompt: int) -> list[int]:
    """Prompt ids, cut in the body (not the answer cue) when too long."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    cue = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    return body[: max(1, max_prompt - len(cue))] + cue


def encode_example(tokenizer, ex, user: int, max_len: int) -> Encoded:
    target = tokenizer(" " + ex.output.strip(), add_special_tokens=False)["input_ids"][: max_len // 2]
    target = target + [tokenizer.eos_token_id]
    prompt = encode_prompt(tokenizer, ex.input, max_len - len(target))
    return Encoded(prompt + target, [-100] * len(prompt) + target, user)


def make_batches(items: list[Encoded], batch_size: int, pad_id: int, rng: random.Random | None):
    """Length-grouped batches (little padding), in random order when rng is given."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(items[i].input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(items[i].input_ids)
            ids[row, :n] = torch.tensor(items[i].input_ids)
            labels[row, :n] = torch.tensor(items[i].labels)
            mask[row, :n] = 1
        users = torch.tensor([items[i].user for i in chunk], dtype=torch.long)
        yield ids, mask, labels, users


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 or newer)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(value) -> bool:
    """train.bf16: true, false, or "auto" (the default): bf16 where the CPU computes it natively.
    Why auto: bf16 autocast was 1.6x faster than float32 on the machine DESIGN.md measured but 20x
    slower on an AVX2-only one (124 s against 6 s for one SmolLM2 step of 8 LaMP-2 items), where
    every bf16 matmul is emulated."""
    if isinstance(value, str):
        if value.lower() != "auto":
            raise ValueError(f"train.bf16: expected true, false or auto, got {value!r}")
        return cpu_has_bf16()
    return bool(value)


def autocast(cfg):
    """bfloat16 autocast on CPU where it pays (use_bf16); float32 master weights either way."""
    dtype = torch.bfloat16 if use_bf16(cfg.get("bf16", "auto")) else None
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def answer_loss(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lm_loss, computing the vocabulary projection only where there is a label.

    Only the few answer tokens of each example are learned, yet a full forward projects every
    position onto the vocabulary (49k x 576 for SmolLM2: ~40 % of the FLOPs and a [B, T, V]
    tensor); projecting the answer positions alone gives the same loss for a fraction of the cost.
    """
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep])


class Progress:
    """A log line every `every` seconds on long loops, so a 10-minute stage is not silent."""

    def __init__(self, what: str, total_steps: int, every: float = 60.0):
        self.what, self.total, self.every = what, total_steps, every
        self.t0 = self.last = time.time()
        self.step = 0

    def tick(self, loss: float, tokens: int):
        self.step += 1
        now = time.time()
        if now - self.last >= self.every and self.step < self.total:
            self.last = now
            log.info("%s: step %d/%d, loss %.3f, %.0f tok/s", self.what, self.step, self.total, loss,
                     tokens / max(now - self.t0, 1e-9))


def n_batches(items, batch_size: int) -> int:
    return math.ceil(len(items) / batch_size)


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


# ---------------------------------------------------------------- results
@dataclass
class RoundResult:
    num_examples: int
    metrics: dict[str, float]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)   # population or group part
    routing_mass: torch.Tensor | None = None                          # [L, k] tokens routed per expert
    mixtures: torch.Tensor | None = None                              # [U, L, k], no ids, shuffled


def optimizer_step(opt, loss: torch.Tensor, params, cfg):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.get("grad_clip", 1.0))
    opt.step()


def _optimizer(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.get("weight_decay", 0.0))


def _encode_users(tokenizer, users, max_len, split="train"):
    items = []
    for i, u in enumerate(users):
        items += [encode_example(tokenizer, ex, i, max_len) for ex in getattr(u, split)]
    return items


# ---------------------------------------------------------------- stage 1: population
def population_round(model: ProperModel, tokenizer, users, cfg, seed: int = 0) -> RoundResult:
    """Train the population LoRA (already loaded into `model`) on these users' histories."""
    model.set_stage("population", train=True)
    items = _encode_users(tokenizer, users, cfg.max_len)
    opt = _optimizer(model.trainable_parameters(), cfg)
    rng = random.Random(seed)
    losses, tokens, t0 = [], 0, time.time()
    progress = Progress("population", cfg.epochs * n_batches(items, cfg.batch_size))
    for epoch in range(cfg.epochs):
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
def group_round(model: ProperModel, tokenizer, users, embeddings: torch.Tensor, cfg,
                others: torch.Tensor | None = None, seed: int = 0,
                user_router: bool = True) -> tuple[RoundResult, torch.Tensor]:
    """Train experts, W_h, W_u (shared) and the users' embeddings (private) for one round.

    embeddings: [U, d] e_u of `users` (updated copy returned); others: previous-round mixtures
    of other users, shuffled and without ids, for the constraint loss. user_router=False is the
    LoRAMoE baseline: tokens alone route, e_u is unused and there is no constraint loss.
    Returns the round result (shared part, routing mass, this round's mixtures) and the new e_u.
    """
    if not model.merged:
        raise RuntimeError("group stage needs the population LoRA merged into the backbone (W_p)")
    model.set_stage("group", train=True)
    emb = torch.nn.Parameter(embeddings.detach().clone().float())
    items = _encode_users(tokenizer, users, cfg.max_len)
    params = model.trainable_parameters() + ([emb] if user_router else [])
    opt = _optimizer(params, cfg)
    lam = float(cfg.get("constraint_weight", 0.1)) if user_router else 0.0
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
            con = constraint_loss(p, others)
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
    seen = mix_tok > 0
    mixtures = mix_sum[seen] / mix_tok[seen].view(-1, 1, 1)
    mixtures = mixtures[torch.randperm(len(mixtures), generator=torch.Generator().manual_seed(seed))]
    metrics = _train_metrics(losses, tokens, t0)
    metrics["constraint_loss"] = float(sum(cons[-10:]) / max(1, len(cons[-10:]))) if cons else math.nan
    result = RoundResult(len(items), metrics, model.part_state("group"), mass, mixtures)
    return result, emb.detach().clone()


# ---------------------------------------------------------------- stage 3: user
def user_train(model: ProperModel, tokenizer, user, embedding: torch.Tensor, cfg, seed: int = 0) -> dict:
    """Train one user's LoRA + LoRA-aware router (the model's user part) from its stage-2 model."""
    model.reset_part("user", seed=seed)
    model.set_stage("user", train=True)
    items = [encode_example(tokenizer, ex, 0, cfg.max_len) for ex in user.train]
    opt = _optimizer(model.trainable_parameters(), cfg)
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
