"""The client's data: its users (read from LaMP files, the run's users once per process) and what is
seeded per user (user_seed; e_u's first value).

A user's seeds depend on the run's seed and the user's id alone, never on the client that holds it:
the same user starts from the same e_u and trains its user LoRA from the same draw in `proper local`,
in any federation and on a deployed client that enrolls it later (client/serving.py).
"""
from __future__ import annotations

import hashlib
import logging
import math

import torch
from omegaconf import DictConfig, OmegaConf

from shared.data.lamp import apply_template, exclude_eval_overlap, load_lamp
from shared.runtime.process import PROCESS

log = logging.getLogger("client.trainer")

EXPERT_CODE_SHARE = 0.9   # of e_u's start that is its expert's code; the rest is the user's own draw


def load_users(cfg: DictConfig, path: str | None = None):
    """(TaskSpec, users) of the LaMP files at `path` (default data.path), prepared as data.* says."""
    spec, users = load_lamp(path or cfg.data.path, task=cfg.data.task, holdout=cfg.data.holdout,
                            max_users=cfg.data.max_users, longest=cfg.data.longest)
    users = apply_template(users, spec.name, cfg.data.template)
    if cfg.data.exclude_eval_overlap:
        users, dropped = exclude_eval_overlap(users)
        log.info("data.exclude_eval_overlap: %d training items dropped (their input is a test or val query)",
                 dropped)
    return spec, users


def all_users(cfg: DictConfig):
    """The run's users, parsed once per process: a simulation process serves many SuperNodes, and
    parsing every user's file for each of them made a round quadratic in users (bench/scale.py)."""
    if PROCESS.users_of is not None and PROCESS.users_of[0] is cfg:   # the apps' shared read-only config
        return PROCESS.users_of[1]
    d = cfg.data
    key = tuple(str(d[k]) for k in ("path", "task", "holdout", "max_users", "longest", "template",
                                    "exclude_eval_overlap"))
    if PROCESS.users is None or PROCESS.users[0] != key:
        PROCESS.users = None
        PROCESS.users = (key, load_users(cfg))
    PROCESS.users_of = (cfg, PROCESS.users[1]) if OmegaConf.is_readonly(cfg) else None
    return PROCESS.users[1]


def users_of_partition(users: list, partition: int, num_partitions: int, per_client: int) -> list:
    """Contiguous blocks of `per_client` users, in file order; the last node may hold fewer."""
    need = math.ceil(len(users) / per_client)
    if num_partitions != need:
        raise ValueError(f"{len(users)} users at {per_client} per client need {need} SuperNodes, "
                         f"the federation has {num_partitions}")
    return users[partition * per_client:(partition + 1) * per_client]


def user_seed(seed: int, user_id: str) -> int:
    return int(hashlib.sha1(f"{seed}:{user_id}".encode()).hexdigest()[:8], 16)


def initial_embedding(seed: int, user_id: str, d_user: int) -> torch.Tensor:
    """A user's first e_u, seeded by (run seed, user id): the same wherever it is created."""
    return torch.randn(d_user, generator=torch.Generator().manual_seed(user_seed(seed, user_id)))


def expert_embedding(seed: int, user_id: str, d_user: int, expert: int) -> torch.Tensor:
    """A user's first e_u when its expert is kept for the stage (group.embedding_start=expert): its
    expert's code (seeded by run seed and expert, the same on every client) plus a smaller share of the
    user's own draw, at the norm of initial_embedding. Users of one expert start close together, so the
    router's user part W_u has k directions to learn, not one per user, and every user of an expert
    pushes W_u the same way: in a federation the clients' W_u updates add up instead of cancelling in
    the average (docs/decisions.md, "e_u starts at its expert's code")."""
    code = torch.randn(d_user, generator=torch.Generator().manual_seed(user_seed(seed, f"expert:{expert}")))
    a = EXPERT_CODE_SHARE
    return (a * code + math.sqrt(1 - a * a) * initial_embedding(seed, user_id, d_user))
