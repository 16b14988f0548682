"""Every stage's evaluation on a client's users: their predictions, scored on the client.

  base, population   one batched pass over every user's queries
  group              the same, each row routed by its user's e_u
  user               each user with its own user LoRA, LoRA-aware router and e_u, many users per
                     batch (ProperModel.user_parts)
  no history         a user with no e_u and no user LoRA is served by the group-stage model with the
                     population's mean mixture (the server's), at the group and user stages
  base-chat          the bare backbone asked through its chat template (plan.BASE_CHAT)
  rag                the bare backbone asked with each user's retrieved items (plan.RAG, method=rag): in
                     its chat template, items and question as the user's turn (retrieval.chat, plan.rag_chat)

The stages but base and base-chat put the users' retrieved items (retrieval.k > 0, attached on this
client: client/trainer.py) before each question; base and base-chat ask the question alone.

Only sufficient statistics and per-user scores (no ids) leave the client (client/client_app.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.store import read_user_adapter
from shared.evaluation.evaluate import predict
from shared.evaluation.metrics import add_stats, example_stats, per_example_scores
from shared.method.plan import BASE_CHAT, RAG, rag_chat, retrieves
from shared.runtime.process import PROCESS

USERS_PER_PASS = 64   # users whose stage-3 parts one evaluation pass stacks (predict_each)


@dataclass
class EvalResult:
    stats: dict[str, np.ndarray]           # sufficient statistics, summed over users
    user_scores: dict[str, float]          # user id -> mean score; only the values leave a client
    num_examples: int


def evaluate(t, stage: str, population: dict | None, group: dict | None, split: str,
             mean_mixture: torch.Tensor | None) -> EvalResult:
    """ClientTrainer.evaluate: every user of t with `split` items, at `stage`."""
    users = [u for u in t.users if getattr(u, split)]
    known = PROCESS.prefetched.get((stage, split))
    if known is not None and all(u.user_id in known for u in users):
        preds = known   # predicted with other virtual clients' users in one batch (client/virtual.py)
    else:
        preds = predictions(t, stage, population, group, split, mean_mixture)
    stats, n, user_scores = None, 0, {}
    for u in users:  # in the users' order, whatever order they were predicted in
        golds = [ex.output for ex in getattr(u, split)]
        stats = add_stats(stats, example_stats(t.spec, preds[u.user_id], golds))
        user_scores[u.user_id] = float(np.mean(per_example_scores(t.spec, preds[u.user_id], golds)))
        n += len(golds)
    return EvalResult(stats or {}, user_scores, n)


def predictions(t, stage: str, population: dict | None, group: dict | None, split: str,
                mean_mixture: torch.Tensor | None) -> dict[str, list[str]]:
    """ClientTrainer.predictions: every user's predictions for its `split` items at `stage`."""
    chat = stage == BASE_CHAT or (stage == RAG and rag_chat(t.cfg, t.tokenizer))
    retrieved = retrieves(stage)
    stage = "base" if stage in (BASE_CHAT, RAG) else stage
    t.prepare(stage, population, group)
    users = [u for u in t.users if getattr(u, split)]
    routed = stage in ("group", "user") and t.switches.user_router
    cold = [u for u in users if routed and not u.train]   # routed by the mean mixture, not an e_u
    warm = [u for u in users if u not in cold]
    preds = predict_each(t, warm, split) if stage == "user" else \
        predict_batched(t, stage, warm, split, chat=chat, retrieved=retrieved)
    preds.update(predict_no_history(t, cold, split, mean_mixture))
    return preds


def predict_each(t, users, split: str) -> dict[str, list[str]]:
    """Stage 3: every user with its own user LoRA, LoRA-aware router and e_u, yet many users per
    batch: each row computes with its user's part (ProperModel.user_parts), so the evaluation
    batches as stage 2's does instead of going user by user. USERS_PER_PASS bounds the
    stacked parts held at once (~3 MB a user for SmolLM2)."""
    t.model.set_stage("user")
    out = {}
    for s in range(0, len(users), USERS_PER_PASS):
        chunk = users[s:s + USERS_PER_PASS]
        parts = [read_user_adapter(t.model, t.store, u.user_id) for u in chunk]
        exs = [ex for u in chunk for ex in getattr(u, split)]
        emb = torch.stack([t.user_embedding(u) for u in chunk for _ in getattr(u, split)])
        rows = torch.tensor([i for i, u in enumerate(chunk) for _ in getattr(u, split)])
        with t.model.user_parts(parts):
            preds = predict(t.model, t.tokenizer, t.spec, exs, t.cfg, user_emb=emb, user_rows=rows)
        out.update(by_user(chunk, split, preds))
    return out


def predict_batched(t, stage: str, users, split: str, chat: bool = False,
                    retrieved: bool = True) -> dict[str, list[str]]:
    """One batched pass over everyone, routed per row in the group stage; chat: the prompts in
    the chat template (stage base-chat; rag with retrieval.chat); retrieved: with the users' retrieved
    items (not stages base, base-chat)."""
    if not users:
        return {}
    t.model.set_stage(stage)
    exs = [ex for u in users for ex in getattr(u, split)]
    emb = None
    if stage == "group" and t.switches.user_router:
        emb = torch.stack([t.user_embedding(u) for u in users for _ in getattr(u, split)])
    return by_user(users, split, predict(t.model, t.tokenizer, t.spec, exs, t.cfg, user_emb=emb, chat=chat,
                                         retrieved=retrieved))


def predict_no_history(t, users, split: str, mean_mixture: torch.Tensor | None) -> dict[str, list[str]]:
    """Users with no history, at the group stage with the population's mean mixture. Without one
    (no group stage ran: its experts are no-ops) the router reads the users' seeded e_u."""
    if not users:
        return {}
    if mean_mixture is None:
        return predict_batched(t, "group", users, split)
    t.model.set_stage("group")
    exs = [ex for u in users for ex in getattr(u, split)]
    with t.model.fixed_mixture(mean_mixture.float()):
        return by_user(users, split, predict(t.model, t.tokenizer, t.spec, exs, t.cfg))


def by_user(users, split: str, preds: list[str]) -> dict[str, list[str]]:
    """Predictions made for every user's `split` examples in order, cut back into each user's."""
    bounds = np.cumsum([0] + [len(getattr(u, split)) for u in users])
    return {u.user_id: preds[a:b] for u, a, b in zip(users, bounds[:-1], bounds[1:])}
