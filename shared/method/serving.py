"""The method's part of serving a finished run: personalizing a user who joins after it.

A user who was not in the run has no e_u, no user LoRA and no LoRA-aware router. Enrollment
(client/serving.py) gives it all three on the run's frozen shared parts, with no server round:

  train_embedding  its e_u, on its history, through the frozen experts and user-aware router
                   (stage 2's loss without the constraint term: see below)
  train_user       then its user LoRA + LoRA-aware router from that stage-2 model, exactly as
                   stage 3 of the run trains every user (shared/method/stages.py)

Why no constraint loss: it pushes the users of a round apart while the experts and routers move
with them; here nothing shared moves, the pool of other users' mixtures is not kept on a client,
and a lone user has no pair in its batches. e_u alone only chooses where, among groups that are
already there, the user's history is best served.
"""
from __future__ import annotations

import random

import torch

from shared.data.encode import encode_example, make_batches
from shared.method.model import ProperModel
from shared.method.optim import make_optimizer
from shared.method.stages import answer_loss, optimizer_step
from shared.runtime.precision import autocast


def train_embedding(model: ProperModel, tokenizer, user, embedding: torch.Tensor, cfg, passes: int = 1,
                    seed: int = 0) -> torch.Tensor:
    """A new user's e_u [d], trained from `embedding` on its history with every model parameter
    frozen (the population merged, the group part loaded). cfg: the group stage's settings; e_u
    learns at lr x user_lr_scale, as in the group stage. passes: over the history, one per group
    round and epoch of the run."""
    if not model.merged:
        raise RuntimeError("enrollment needs the population LoRA merged into the backbone (W_p)")
    model.set_stage("group")  # train=False: nothing of the model is trainable
    emb = torch.nn.Parameter(embedding.detach().clone().float().view(1, -1).to(model.device))
    items = [encode_example(tokenizer, ex, 0, cfg.max_len) for ex in user.train]
    lr = float(cfg.lr) * float(cfg.get("user_lr_scale", 1.0))
    opt = make_optimizer([emb], cfg, lr=lr)
    rng = random.Random(seed)
    for _ in range(passes):
        for ids, mask, labels, _ in make_batches(items, cfg.batch_size, tokenizer.pad_token_id, rng):
            ids, mask, labels = (t.to(model.device) for t in (ids, mask, labels))   # the client's device
            with autocast(cfg, model.device.type), model.users(emb.expand(len(ids), -1)):
                loss = answer_loss(model.lm, ids, mask, labels)
            optimizer_step(opt, loss, [emb], cfg)
    return emb.detach().view(-1).to("cpu", copy=True)   # for the user's private file
