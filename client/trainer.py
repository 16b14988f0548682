"""What a client does for each stage, on the users it holds; the Flower ClientApp and
`proper local` (one client holding every user) both call this.

Everything private stays in the client's UserStore (its own disk): the users' embeddings e_u
(stage 2), their LoRAs and LoRA-aware routers (stage 3). Replies carry only the shared parts
(population LoRA, or experts + routers), counts, routing mass, anonymous shuffled mixtures and
metrics.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from shared.data.lamp import apply_template, exclude_eval_overlap, load_lamp
from shared.evaluation.evaluate import predict
from shared.evaluation.metrics import add_stats, example_stats, per_example_scores
from shared.method.model import ProperModel
from shared.method.optim import round_lr
from shared.method.plan import uses_user_router
from shared.method.stages import RoundResult, initial_mixtures, train_group, train_population, train_user
from shared.runtime.backbone import load_backbone
from shared.runtime.config import stage_cfg
from shared.runtime.persist import UserStore, export_peft_adapter, import_peft_adapter, load_tensors, save_tensors
from shared.runtime.targets import find_target_modules

log = logging.getLogger(__name__)

# One backbone per process, whatever number of messages or (simulated) clients it serves.
_MODELS: dict[str, tuple[ProperModel, object]] = {}


def get_model(cfg: DictConfig) -> tuple[ProperModel, object]:
    key = OmegaConf.to_yaml(OmegaConf.create({"model": cfg.model, "adapters": cfg.adapters, "seed": cfg.seed}))
    if key not in _MODELS:
        lm, tok = load_backbone(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)
        targets = find_target_modules(lm, list(cfg.model.targets) if cfg.model.targets else None)
        _MODELS.clear()  # a process holds one backbone: a new config replaces the old one
        _MODELS[key] = (ProperModel(lm, targets, seed=cfg.seed, **cfg.adapters), tok)
    return _MODELS[key]


def round_cfg(cfg: DictConfig, stage: str, server_round: int) -> DictConfig:
    """A stage's settings for one of its rounds: the client lr follows train.lr_schedule."""
    out = stage_cfg(cfg, stage)
    out.lr = round_lr(out, server_round)
    return out


def user_seed(seed: int, user_id: str) -> int:
    return int(hashlib.sha1(f"{seed}:{user_id}".encode()).hexdigest()[:8], 16)


def load_users(cfg: DictConfig, path: str | None = None):
    spec, users = load_lamp(path or cfg.data.path, task=cfg.data.task, holdout=cfg.data.holdout,
                            max_users=cfg.data.max_users, longest=cfg.data.longest)
    users = apply_template(users, spec.name, cfg.data.template)
    if cfg.data.exclude_eval_overlap:
        users, dropped = exclude_eval_overlap(users)
        log.info("data.exclude_eval_overlap: %d training items dropped (their input is a test or val query)",
                 dropped)
    return spec, users


@dataclass
class EvalResult:
    stats: dict[str, np.ndarray]           # sufficient statistics, summed over users
    user_scores: dict[str, float]          # user id -> mean score; only the values leave a client
    num_examples: int


class ClientTrainer:
    def __init__(self, cfg: DictConfig, spec, users, state_dir: str, client_seed: int = 0):
        if not users:
            raise ValueError("a client needs at least one user")
        self.cfg, self.spec, self.users = cfg, spec, users
        self.store = UserStore(state_dir)
        self.seed = cfg.seed * 1_000_003 + client_seed
        self.model, self.tokenizer = get_model(cfg)

    # ---- putting the model in the state a stage starts from
    def _prepare(self, stage: str, population=None, group=None):
        m = self.model
        if stage in ("base", "population"):
            if m.merged:
                m.unmerge_population()
            if population is not None:
                m.load_part_state("population", population, source="population LoRA from server")
            elif stage == "population":
                m.reset_part("population", seed=self.cfg.seed)
        else:
            if population is None:
                raise ValueError(f"stage {stage} needs the final population LoRA")
            m.merge_population(population)
            if group is not None:
                m.load_part_state("group", group, source="group parameters from server")
            else:  # first group round, or a method without one (OPPU): experts start at B = 0, a no-op
                m.reset_part("group", seed=self.cfg.seed)

    def _embedding(self, user, for_round: int | None = None) -> torch.Tensor:
        """e_u: the latest, or the one a group round `for_round` starts from. Each save keeps the
        value from before that round too, so a round redone after a crash starts where it did."""
        saved = self.store.load(user.user_id, "embedding")
        if saved is not None:
            if for_round is not None and int(saved["round"]) >= for_round:
                return saved["e_u_before"]
            return saved["e_u"]
        g = torch.Generator().manual_seed(user_seed(self.cfg.seed, user.user_id))
        return torch.randn(self.model.d_user, generator=g)

    def initial(self, part: str, population: dict | None = None) -> dict[str, torch.Tensor]:
        """The starting point of a server-coordinated part, as every client would build it (seeded
        by the run's seed alone): a server needs it to take a server learning-rate step."""
        self._prepare("population" if part == "population" else "group", population)
        return self.model.part_state(part)

    # ---- stage 1
    def population(self, population: dict | None, server_round: int) -> RoundResult:
        self._prepare("population", population)
        return train_population(self.model, self.tokenizer, self.users, round_cfg(self.cfg, "population", server_round),
                                seed=self.seed + server_round)

    # ---- stage 2
    def group(self, population: dict, group: dict | None, others: torch.Tensor | None,
              server_round: int) -> RoundResult:
        self._prepare("group", population, group)
        if others is not None and len(others):
            others = self._drop_own(others, server_round)
        before = torch.stack([self._embedding(u, server_round) for u in self.users])
        result, emb, by_user = train_group(self.model, self.tokenizer, self.users, before,
                                           round_cfg(self.cfg, "group", server_round),
                                           others=others, seed=self.seed + server_round,
                                           user_router=uses_user_router(self.cfg), return_user_mixtures=True)
        rnd = torch.tensor([server_round])
        for u, e, b in zip(self.users, emb, before):
            self.store.save(u.user_id, "embedding", {"e_u": e, "e_u_before": b, "round": rnd})
        sent = self._own_mixtures(server_round)
        save_tensors(self.store.root / "sent_mixtures.safetensors",
                     {"mixtures": result.mixtures, "previous": sent if sent is not None else result.mixtures[:0],
                      "round": rnd})
        self._save_user_mixtures(by_user, server_round)
        return result  # by_user names users by position: it stays on this disk, never in the reply

    def _save_user_mixtures(self, by_user: torch.Tensor, server_round: int):
        """Each user's mixture and dominant expert, on this client's disk only: what group recovery
        (shared/evaluation/groups.py) compares with known groups after the run."""
        from shared.evaluation.groups import write_user_mixtures
        write_user_mixtures(self.store.root, [u.user_id for u in self.users], by_user.numpy(), server_round)

    def initial_mixtures(self, population: dict, group: dict | None) -> torch.Tensor:
        """The users' mixtures under the group part round 1 starts from, with their starting e_u
        (shuffled, no ids): the first pool for the constraint loss. Nothing is trained or stored."""
        self._prepare("group", population, group)
        emb = torch.stack([self._embedding(u, 1) for u in self.users])
        mixtures = initial_mixtures(self.model, self.tokenizer, self.users, emb, stage_cfg(self.cfg, "group"),
                                    seed=self.seed)
        # remembered as "sent before round 1", so round 1 drops them from the pool it gets back
        save_tensors(self.store.root / "sent_mixtures.safetensors",
                     {"mixtures": mixtures, "previous": mixtures[:0], "round": torch.tensor([0])})
        return mixtures

    def _own_mixtures(self, server_round: int) -> torch.Tensor | None:
        """The mixtures this client sent in the round before `server_round`."""
        path = self.store.root / "sent_mixtures.safetensors"
        if not path.exists():
            return None
        saved = load_tensors(path)[0]
        return saved["previous"] if int(saved["round"]) >= server_round else saved["mixtures"]

    def _drop_own(self, others: torch.Tensor, server_round: int) -> torch.Tensor:
        """The server's pool holds this client's own users too (it cannot tell, no ids travel);
        pushing a user away from its own previous mixture would be wrong, so drop exact matches."""
        own = self._own_mixtures(server_round)
        if own is None or not len(own) or own.shape[1:] != others.shape[1:]:
            return others
        own = own.to(others.dtype)
        keep = [i for i in range(len(others)) if not any(torch.equal(others[i], o) for o in own)]
        return others[keep]

    # ---- stage 3
    def user(self, population: dict, group: dict | None) -> dict[str, float]:
        self._prepare("user", population, group)
        cfg = stage_cfg(self.cfg, "user")
        losses, seconds, t0, last = [], 0.0, time.time(), time.time()
        for i, u in enumerate(self.users, 1):
            m = train_user(self.model, self.tokenizer, u, self._embedding(u), cfg,
                           seed=user_seed(self.cfg.seed, u.user_id))
            self.save_user_adapter(u.user_id)
            losses.append(m["train_loss"])
            seconds += m["train_seconds"]
            if time.time() - last > 60 and i < len(self.users):
                last = time.time()
                log.info("user stage: %d/%d users trained (%.0f s)", i, len(self.users), last - t0)
        return {"train_loss": float(np.nanmean(losses)), "train_seconds": seconds,
                "num_users": float(len(self.users))}

    def save_user_adapter(self, user_id: str):
        """The user LoRA as a PEFT adapter directory, and the LoRA-aware router beside it."""
        d = self.store.path(user_id, "user").with_suffix("")
        export_peft_adapter(self.model, "user", d, base_model=f"{self.cfg.model.name} + population LoRA")
        router = {k: v for k, v in self.model.part_state("user").items() if ".router_g" in k}
        self.store.save(user_id, "router", router)

    def load_user_adapter(self, user_id: str):
        import_peft_adapter(self.model, "user", self.store.path(user_id, "user").with_suffix(""))
        router = self.store.load(user_id, "router")
        if router is None:
            raise FileNotFoundError(f"no LoRA-aware router stored for user {user_id!r} in {self.store.root}")
        state = self.model.part_state("user")
        state.update(router)
        self.model.load_part_state("user", state, source=str(self.store.path(user_id, "router")))

    # ---- evaluation of any stage on these users
    def evaluate(self, stage: str, population: dict | None = None, group: dict | None = None,
                 split: str = "test") -> EvalResult:
        self._prepare(stage, population, group)
        self.model.set_stage(stage)
        stats, n, user_scores = None, 0, {}
        users = [u for u in self.users if getattr(u, split)]
        if stage == "user":  # each user has its own adapter: one user at a time
            per_user = []
            for u in users:
                self.load_user_adapter(u.user_id)
                emb = self._embedding(u).view(1, -1).expand(len(getattr(u, split)), -1)
                per_user.append(predict(self.model, self.tokenizer, self.spec, getattr(u, split), self.cfg,
                                        user_emb=emb))
        else:  # one batched pass over everyone, routed per row in the group stage
            exs = [ex for u in users for ex in getattr(u, split)]
            emb = None
            if stage == "group" and uses_user_router(self.cfg):
                emb = torch.stack([self._embedding(u) for u in users for _ in getattr(u, split)])
            preds = predict(self.model, self.tokenizer, self.spec, exs, self.cfg, user_emb=emb)
            bounds = np.cumsum([0] + [len(getattr(u, split)) for u in users])
            per_user = [preds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        for u, preds in zip(users, per_user):
            golds = [ex.output for ex in getattr(u, split)]
            stats = add_stats(stats, example_stats(self.spec, preds, golds))
            user_scores[u.user_id] = float(np.mean(per_example_scores(self.spec, preds, golds)))
            n += len(golds)
        return EvalResult(stats or {}, user_scores, n)
