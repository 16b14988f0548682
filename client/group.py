"""The group stage's client side (stage 2): a round on the users this client holds, and the first pool.

  prepare   the population LoRA merged (W_p), the round's experts and routers loaded (or seeded)
  train     experts + user-aware router (shared) and each user's e_u (private), with the constraint
            loss against the others' mixtures the server pooled (shared/method/stages.py train_group)
  release   the experts and routers, the routing mass and the users' mixtures as privacy.mixtures
            allows (client/release.py); e_u, each user's mixture and what was sent stay in the store

The stage's experiment switches (the assignment of group.constraint_form=assign and its start, the
e_u start) are read once, into GroupSwitches; the round below reads nothing else of the config.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from client import store as S
from client.data import expert_embedding
from shared.method.optim import round_lr
from shared.method.plan import starts_at_expert_code, uses_assignment, uses_user_router
from shared.method.signature_start import SignatureStart, signature_start_of
from shared.method.stages import RoundResult, assign_experts, initial_mixtures, split_probe, train_group
from shared.runtime.config import stage_cfg

log = logging.getLogger("client.trainer")


def round_cfg(cfg: DictConfig, stage: str, server_round: int) -> DictConfig:
    """A stage's settings for one of its rounds: the client lr follows train.lr_schedule."""
    out = stage_cfg(cfg, stage)
    out.lr = round_lr(out, server_round)
    return out


@dataclass(frozen=True)
class GroupSwitches:
    """What of the group stage a client's round does, read from the config here only."""
    user_router: bool                  # the user-aware router reads e_u (every method but LoRAMoE)
    assign: bool                       # group.constraint_form=assign: each user gets an expert (IFCA)
    reassign: bool                     # assign: re-estimated every round; false: the start is kept
    assign_probe: int                  # assign: items per user kept out of training to assign by
    expert_code_start: bool            # a user's first e_u is its expert's code (group.embedding_start)
    signature: SignatureStart | None   # the assignment starts from the users' answer signatures

    @classmethod
    def of(cls, cfg: DictConfig) -> GroupSwitches:
        return cls(uses_user_router(cfg), uses_assignment(cfg), bool(cfg.group.reassign),
                   int(cfg.group.assign_probe), starts_at_expert_code(cfg), signature_start_of(cfg))


def group_round(t, population: dict, group: dict | None, others: torch.Tensor | None,
                server_round: int) -> RoundResult:
    """ClientTrainer.group: one group round on t's users with a history."""
    sw = t.switches
    t.prepare("group", population, group)
    if not t.trained:
        return t.untrained("group")
    if others is not None and len(others):
        others = S.drop_own(t.store, others, server_round)
    before = torch.stack([t.user_embedding(u, server_round) for u in t.trained])
    cfg = round_cfg(t.cfg, "group", server_round)
    assignment, fit = None, t.trained
    if sw.assign:
        # each user's expert, from the experts this round starts from: computed here, used here,
        # on probe items the group stage does not train on (group.assign_probe; 0: every item)
        fixed = not sw.reassign   # a kept assignment reads no probe items: train on all
        fit, probe = split_probe(t.trained, 0 if fixed else sw.assign_probe, int(t.cfg.seed))
        start = assignment_start(t)
        assignment = assign_experts(t.model, t.tokenizer, probe, cfg, int(t.cfg.seed), start, fixed=fixed)
        if sw.expert_code_start:   # a user's first group round
            for i, u in enumerate(t.trained):
                if t.store.load(u.user_id, "embedding") is None:
                    before[i] = expert_embedding(t.cfg.seed, u.user_id, t.model.d_user, int(assignment[i]))
    result, emb, by_user = train_group(t.model, t.tokenizer, fit, before, cfg,
                                       others=others, seed=t.seed + server_round,
                                       user_router=sw.user_router, return_user_mixtures=True,
                                       assignment=assignment)
    result.mixtures = t.release.mixtures(result.mixtures, server_round)
    result.routing_mass = t.release.mass(result.routing_mass, result.num_examples)
    rnd = torch.tensor([server_round])
    for u, e, b in zip(t.trained, emb, before):
        S.save_embedding(t.store, u.user_id, e, b, rnd)
    sent = S.own_mixtures(t.store, server_round)
    S.save_sent(t.store, result.mixtures, sent if sent is not None else result.mixtures[:0], rnd)
    S.save_user_mixtures(t.store, [u.user_id for u in t.trained], by_user, server_round)
    return result  # by_user names users by position: it stays on this disk, never in the reply


def assignment_start(t) -> torch.Tensor | None:
    """[U] the assignment's start while the experts are identical (assign_experts), or None for
    the seeded hash. Computed only then (afterwards the experts' losses decide), unless
    group.reassign=false keeps the start for the whole stage."""
    if t.switches.reassign and any(layer.expert_B.any() for _, layer in t.model.layers()):
        return None
    if t.assign_start is not None:        # the bench's hook
        missing = [u.user_id for u in t.trained if u.user_id not in t.assign_start]
        if missing:
            raise ValueError(f"assign_start has no expert for user(s) {', '.join(missing[:3])}")
        return torch.tensor([t.assign_start[u.user_id] for u in t.trained])
    sig = t.switches.signature
    if sig is None:
        return None
    if t.federated:   # decided by the server's signature rounds, kept on this client (client/signature_replies.py)
        from client.signature_replies import kept_groups
        return kept_groups(t)
    if len(t.trained) < sig.k:
        raise ValueError(f"group.assign_start=signature clusters the users into k={sig.k} groups, and this run "
                         f"holds {len(t.trained)} user(s) with a history: lower adapters.k, or use "
                         "group.assign_start=random (docs/decisions.md)")
    if t._signature_start is None:   # deterministic given the population: computed once per trainer
        from shared.method.answer_signatures import signature_groups
        t._signature_start = signature_groups(t.model, t.tokenizer, t.trained, sig.max_len, sig.k, sig.codes,
                                              sig.seed, labels=t.spec.kind != "generation", prior=sig.prior)
        log.info("group: assignment starts from the users' answer signatures (%s users per expert)",
                 "/".join(str(int((t._signature_start == e).sum())) for e in range(sig.k)))
    return t._signature_start


def first_pool(t, population: dict, group: dict | None) -> torch.Tensor:
    """ClientTrainer.initial_mixtures: the users' mixtures under the group part round 1 starts from,
    with their starting e_u (shuffled, no ids). Nothing is trained; what is sent is remembered."""
    t.prepare("group", population, group)
    empty = torch.zeros(0, len(t.model.layer_names), t.model.k)
    if not t.trained:
        return empty
    emb = torch.stack([t.user_embedding(u, 1) for u in t.trained])
    if not t.release.sends_mixtures:   # nothing to send: skip the forward pass
        return empty
    mixtures = initial_mixtures(t.model, t.tokenizer, t.trained, emb, stage_cfg(t.cfg, "group"), seed=t.seed)
    mixtures = t.release.mixtures(mixtures, 0)
    # remembered as "sent before round 1", so round 1 drops them from the pool it gets back
    S.save_sent(t.store, mixtures, mixtures[:0], torch.tensor([0]))
    return mixtures
