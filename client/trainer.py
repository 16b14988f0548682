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
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from shared.data.canaries import run_canaries, with_canaries
from shared.data.lamp import apply_template, exclude_eval_overlap, load_lamp
from shared.evaluation.evaluate import predict
from shared.evaluation.metrics import add_stats, example_stats, per_example_scores
from shared.method.model import ProperModel
from shared.method.optim import round_lr
from shared.method.plan import BASE_CHAT, starts_at_expert_code, uses_assignment, uses_user_router
from shared.method.stages import (
    RoundResult,
    assign_experts,
    initial_mixtures,
    split_probe,
    train_group,
    train_population,
    train_user,
)
from shared.runtime.backbone import load_backbone
from shared.runtime.config import stage_cfg, to_yaml
from shared.runtime.persist import (
    UserStore,
    export_peft_adapter,
    import_peft_adapter,
    load_tensors,
    read_peft_adapter,
    save_tensors,
)
from shared.runtime.targets import find_target_modules

log = logging.getLogger(__name__)

USERS_PER_PASS = 64   # users whose stage-3 parts one evaluation pass stacks (ClientTrainer._predict_each)

# Predictions made ahead for the users of several virtual clients at once, {(stage, split): {user
# id: predictions}}: each virtual client's evaluate then reads its users' (client/virtual.py).
_PREFETCHED: dict[tuple[str, str], dict[str, list[str]]] = {}


@contextmanager
def prefetched(preds: dict[tuple[str, str], dict[str, list[str]]]):
    _PREFETCHED.clear()
    _PREFETCHED.update(preds)
    try:
        yield
    finally:
        _PREFETCHED.clear()


# One backbone per process, whatever number of messages or (simulated) clients it serves.
_MODELS: dict[str, tuple[ProperModel, object]] = {}
_LAST_KEY: list = []   # [config, its model key], for a read-only config (shared/runtime/runconfig.py)


def get_model(cfg: DictConfig) -> tuple[ProperModel, object]:
    if _LAST_KEY and _LAST_KEY[0] is cfg:   # the apps' shared read-only config: its key once (6 ms)
        key = _LAST_KEY[1]
    else:
        key = OmegaConf.to_yaml(OmegaConf.create({"model": cfg.model, "adapters": cfg.adapters, "seed": cfg.seed}))
        _LAST_KEY[:] = [cfg, key] if OmegaConf.is_readonly(cfg) else []
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


def initial_embedding(seed: int, user_id: str, d_user: int) -> torch.Tensor:
    """A user's first e_u, seeded by (run seed, user id): the same wherever it is created."""
    return torch.randn(d_user, generator=torch.Generator().manual_seed(user_seed(seed, user_id)))


EXPERT_CODE_SHARE = 0.9   # of e_u's start that is its expert's code; the rest is the user's own draw


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


def load_users(cfg: DictConfig, path: str | None = None):
    spec, users = load_lamp(path or cfg.data.path, task=cfg.data.task, holdout=cfg.data.holdout,
                            max_users=cfg.data.max_users, longest=cfg.data.longest)
    users = apply_template(users, spec.name, cfg.data.template)
    if cfg.data.exclude_eval_overlap:
        users, dropped = exclude_eval_overlap(users)
        log.info("data.exclude_eval_overlap: %d training items dropped (their input is a test or val query)",
                 dropped)
    return spec, users


def save_user_adapter(model: ProperModel, store: UserStore, user_id: str, backbone: str):
    """The model's user LoRA as a PEFT adapter directory, and the LoRA-aware router beside it."""
    d = store.path(user_id, "user").with_suffix("")
    export_peft_adapter(model, "user", d, base_model=f"{backbone} + population LoRA")
    router = {k: v for k, v in model.part_state("user").items() if ".router_g" in k}
    store.save(user_id, "router", router)


def load_user_adapter(model: ProperModel, store: UserStore, user_id: str):
    """A user's LoRA and LoRA-aware router from the store into the model's user part."""
    import_peft_adapter(model, "user", store.path(user_id, "user").with_suffix(""))
    router = store.load(user_id, "router")
    if router is None:
        raise FileNotFoundError(f"no LoRA-aware router stored for user {user_id!r} in {store.root}")
    state = model.part_state("user")
    state.update(router)
    model.load_part_state("user", state, source=str(store.path(user_id, "router")))


def read_user_adapter(model: ProperModel, store: UserStore, user_id: str) -> dict[str, torch.Tensor]:
    """A user's LoRA and LoRA-aware router as a user-part state (what part_state("user") gives once
    load_user_adapter put them in), read from the store without loading them into the model, checked
    against it: the parts a multi-user batch stacks (ProperModel.user_parts)."""
    path = store.path(user_id, "user").with_suffix("")
    state = read_peft_adapter(model, "user", path)
    router = store.load(user_id, "router")
    if router is None:
        raise FileNotFoundError(f"no LoRA-aware router stored for user {user_id!r} in {store.root}")
    state.update(router)
    model.check_part_state("user", state, source=str(path))
    return state


def export_shared_parts(model: ProperModel, out_dir: Path, with_group: bool, backbone: str,
                        config_yaml: str | None = None):
    """The run's shared parts as the model holds them, in the files `proper local` writes (docs/formats.md):
    population_lora/ (PEFT) and group.safetensors, with config.yaml when given. What serving and
    enrollment (client/serving.py) load on a machine that has them."""
    from shared.runtime.persist import atomic_write_text, save_group
    export_peft_adapter(model, "population", out_dir / "population_lora", base_model=backbone)
    if with_group:
        save_group(model, out_dir / "group.safetensors")
    if config_yaml is not None:
        atomic_write_text(out_dir / "config.yaml", config_yaml)


@dataclass
class EvalResult:
    stats: dict[str, np.ndarray]           # sufficient statistics, summed over users
    user_scores: dict[str, float]          # user id -> mean score; only the values leave a client
    num_examples: int


class ClientTrainer:
    def __init__(self, cfg: DictConfig, spec, users, state_dir: str, client_seed: int = 0, keep_shared: bool = False):
        if not users:
            raise ValueError("a client needs at least one user")
        # privacy.canaries: the canary items of this client's chosen users, added here, on the client
        # that holds them (shared/data/canaries.py); nothing about them is sent
        self.canaries = [c for c in run_canaries(cfg, users) if c.user in {u.user_id for u in users}]
        if self.canaries:
            users = with_canaries(users, self.canaries)
        self.cfg, self.spec, self.users = cfg, spec, users
        # users with a history train; one with none (an empty profile) is only evaluated
        self.trained = [u for u in users if u.train]
        self.no_history = [u for u in users if not u.train]
        if self.no_history:
            log.warning("%d user(s) with no history (%s%s): skipped in training, evaluated with the population "
                        "and group stages and the population's mean mixture", len(self.no_history),
                        ", ".join(u.user_id for u in self.no_history[:3]), ", ..." if len(self.no_history) > 3 else "")
        self.store = UserStore(state_dir)
        # a deployed client keeps the run's final shared parts beside its users' state, to serve them
        # and enroll new users later (client/serving.py); simulated clients share the run's copy
        self.keep_shared = keep_shared
        self.seed = cfg.seed * 1_000_003 + client_seed
        self.model, self.tokenizer = get_model(cfg)
        # an experiment hook, set by bench/group_ablation.py only and kept in memory only: user id ->
        # the expert group.constraint_form=assign starts from, in place of the seeded hash
        self.assign_start: dict[str, int] | None = None
        self._signature_start: torch.Tensor | None = None     # group.assign_start=signature, once computed
        # a federated client (client/runtime.py sets it): its users' signature groups come from the
        # server's rounds, never from clustering its own users alone (each client would number them its own way)
        self.federated = False

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
        return initial_embedding(self.cfg.seed, user.user_id, self.model.d_user)

    def initial(self, part: str, population: dict | None = None) -> dict[str, torch.Tensor]:
        """The starting point of a server-coordinated part, as every client would build it (seeded
        by the run's seed alone): a server needs it to take a server learning-rate step."""
        self._prepare("population" if part == "population" else "group", population)
        return self.model.part_state(part)

    def _untrained(self, part: str) -> RoundResult:
        """A round on a client none of whose users has a history: the part comes back as it came,
        with zero examples, so it weighs nothing in the average and a chain passes it on unchanged.
        The metrics are zeros, not NaN: weighted by zero examples they must add nothing."""
        metrics = {"train_loss": 0.0, "train_tokens": 0.0, "train_seconds": 0.0, "tokens_per_s": 0.0}
        if part == "population":
            return RoundResult(0, metrics, self.model.part_state("population"))
        shape = (len(self.model.layer_names), self.model.k)
        return RoundResult(0, {**metrics, "constraint_loss": 0.0}, self.model.part_state("group"),
                           torch.zeros(shape), torch.zeros(0, *shape))

    # ---- stage 1
    def population(self, population: dict | None, server_round: int) -> RoundResult:
        self._prepare("population", population)
        if not self.trained:
            return self._untrained("population")
        return train_population(self.model, self.tokenizer, self.trained,
                                round_cfg(self.cfg, "population", server_round), seed=self.seed + server_round)

    # ---- stage 2
    def group(self, population: dict, group: dict | None, others: torch.Tensor | None,
              server_round: int) -> RoundResult:
        self._prepare("group", population, group)
        if not self.trained:
            return self._untrained("group")
        if others is not None and len(others):
            others = self._drop_own(others, server_round)
        before = torch.stack([self._embedding(u, server_round) for u in self.trained])
        cfg = round_cfg(self.cfg, "group", server_round)
        assignment, fit = None, self.trained
        if uses_assignment(self.cfg):
            # each user's expert, from the experts this round starts from: computed here, used here,
            # on probe items the group stage does not train on (group.assign_probe; 0: every item)
            fixed = not cfg.get("reassign", True)   # a kept assignment reads no probe items: train on all
            fit, probe = split_probe(self.trained, 0 if fixed else int(cfg.get("assign_probe", 0)), int(self.cfg.seed))
            start = self._assignment_start(cfg)
            assignment = assign_experts(self.model, self.tokenizer, probe, cfg, int(self.cfg.seed), start, fixed=fixed)
            if starts_at_expert_code(self.cfg):   # a user's first group round
                for i, u in enumerate(self.trained):
                    if self.store.load(u.user_id, "embedding") is None:
                        before[i] = expert_embedding(self.cfg.seed, u.user_id, self.model.d_user,
                                                     int(assignment[i]))
        result, emb, by_user = train_group(self.model, self.tokenizer, fit, before, cfg,
                                           others=others, seed=self.seed + server_round,
                                           user_router=uses_user_router(self.cfg), return_user_mixtures=True,
                                           assignment=assignment)
        result.mixtures = self._release_mixtures(result.mixtures, server_round)
        result.routing_mass = self._release_mass(result.routing_mass, result.num_examples)
        rnd = torch.tensor([server_round])
        for u, e, b in zip(self.trained, emb, before):
            self.store.save(u.user_id, "embedding", {"e_u": e, "e_u_before": b, "round": rnd})
        sent = self._own_mixtures(server_round)
        save_tensors(self.store.root / "sent_mixtures.safetensors",
                     {"mixtures": result.mixtures, "previous": sent if sent is not None else result.mixtures[:0],
                      "round": rnd})
        self._save_user_mixtures(by_user, server_round)
        return result  # by_user names users by position: it stays on this disk, never in the reply

    def _assignment_start(self, cfg) -> torch.Tensor | None:
        """[U] the assignment's start while the experts are identical (assign_experts), or None for
        the seeded hash. Computed only then (afterwards the experts' losses decide), unless
        group.reassign=false keeps the start for the whole stage."""
        if cfg.get("reassign", True) and any(layer.expert_B.any() for _, layer in self.model.layers()):
            return None
        if self.assign_start is not None:        # the bench's hook
            missing = [u.user_id for u in self.trained if u.user_id not in self.assign_start]
            if missing:
                raise ValueError(f"assign_start has no expert for user(s) {', '.join(missing[:3])}")
            return torch.tensor([self.assign_start[u.user_id] for u in self.trained])
        if cfg.get("assign_start", "random") != "signature":
            return None
        if self.federated:   # decided by the server's signature rounds, kept on this client (client/signature.py)
            from client.signature import kept_groups
            return kept_groups(self)
        k = self.model.k
        if len(self.trained) < k:
            raise ValueError(f"group.assign_start=signature clusters the users into k={k} groups, and this run "
                             f"holds {len(self.trained)} user(s) with a history: lower adapters.k, or use "
                             "group.assign_start=random (docs/decisions.md)")
        if self._signature_start is None:   # deterministic given the population: computed once per process
            from shared.method.signatures import signature_groups
            self._signature_start = signature_groups(self.model, self.tokenizer, self.trained, int(cfg.max_len), k,
                                                     int(cfg.signature_codes), int(self.cfg.seed),
                                                     labels=self.spec.kind != "generation",
                                                     prior=float(cfg.signature_prior))
            log.info("group: assignment starts from the users' answer signatures (%s users per expert)",
                     "/".join(str(int((self._signature_start == e).sum())) for e in range(k)))
        return self._signature_start

    def _save_user_mixtures(self, by_user: torch.Tensor, server_round: int):
        """Each user's mixture and dominant expert, on this client's disk only: what group recovery
        (shared/evaluation/groups.py) compares with known groups after the run."""
        from shared.evaluation.groups import write_user_mixtures
        write_user_mixtures(self.store.root, [u.user_id for u in self.trained], by_user.numpy(), server_round)

    def initial_mixtures(self, population: dict, group: dict | None) -> torch.Tensor:
        """The users' mixtures under the group part round 1 starts from, with their starting e_u
        (shuffled, no ids): the first pool for the constraint loss. Nothing is trained or stored."""
        self._prepare("group", population, group)
        if not self.trained:
            return torch.zeros(0, len(self.model.layer_names), self.model.k)
        emb = torch.stack([self._embedding(u, 1) for u in self.trained])
        if self.cfg.privacy.get("mixtures", "share") == "local":   # nothing to send: skip the forward pass
            return torch.zeros(0, len(self.model.layer_names), self.model.k)
        mixtures = initial_mixtures(self.model, self.tokenizer, self.trained, emb, stage_cfg(self.cfg, "group"),
                                    seed=self.seed)
        mixtures = self._release_mixtures(mixtures, 0)
        # remembered as "sent before round 1", so round 1 drops them from the pool it gets back
        save_tensors(self.store.root / "sent_mixtures.safetensors",
                     {"mixtures": mixtures, "previous": mixtures[:0], "round": torch.tensor([0])})
        return mixtures

    def _release_mass(self, mass: torch.Tensor, num_examples: int) -> torch.Tensor:
        """What the reply carries as the group average's per-expert weights: share: the routing mass as
        computed; noise / local: the reply's examples for every expert (an example-weighted average).
        The mass of a one-user client, normalised per layer, is that user's mixture: sent under
        noise or local it would hand the server what those options keep back."""
        if self.cfg.privacy.get("mixtures", "share") == "share":
            return mass
        return torch.full_like(mass, float(num_examples))

    def _release_mixtures(self, mixtures: torch.Tensor, server_round: int) -> torch.Tensor:
        """What the reply carries of the users' mixtures (privacy.mixtures): share: as computed; noise:
        each value plus Gaussian noise of std privacy.mixture_noise (seeded by privacy.dp.seed where
        set, else fresh); local: none (the constraint loss keeps to this client's own users)."""
        how = self.cfg.privacy.get("mixtures", "share")
        if how == "local":
            return mixtures[:0]
        if how == "noise" and len(mixtures):
            seed = self.cfg.privacy.dp.get("seed")
            gen = torch.Generator()
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(seed) * 1_000_003 + self.seed * 7919 + server_round)
            std = float(self.cfg.privacy.mixture_noise)
            return mixtures + std * torch.randn(mixtures.shape, generator=gen, dtype=mixtures.dtype)
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
        if self.keep_shared:  # the final shared parts: train.user is the last message that carries them
            export_shared_parts(self.model, self.store.root, group is not None, self.cfg.model.name,
                                to_yaml(self.cfg))
        cfg = stage_cfg(self.cfg, "user")
        losses, seconds, t0, last = [], 0.0, time.time(), time.time()
        for i, u in enumerate(self.trained, 1):
            m = train_user(self.model, self.tokenizer, u, self._embedding(u), cfg,
                           seed=user_seed(self.cfg.seed, u.user_id))
            self.save_user_adapter(u.user_id)
            losses.append(m["train_loss"])
            seconds += m["train_seconds"]
            if time.time() - last > 60 and i < len(self.trained):
                last = time.time()
                log.info("user stage: %d/%d users trained (%.0f s)", i, len(self.trained), last - t0)
        loss = {"train_loss": float(np.nanmean(losses))} if losses else {}  # none without a trained user
        return {**loss, "train_seconds": seconds, "num_users": float(len(self.trained))}

    def save_user_adapter(self, user_id: str):
        save_user_adapter(self.model, self.store, user_id, self.cfg.model.name)

    def load_user_adapter(self, user_id: str):
        load_user_adapter(self.model, self.store, user_id)

    # ---- evaluation of any stage on these users
    def evaluate(self, stage: str, population: dict | None = None, group: dict | None = None,
                 split: str = "test", mean_mixture: torch.Tensor | None = None) -> EvalResult:
        """Every user with `split` items, at `stage`. A user with no history has no e_u and no user
        LoRA: in the group and user stages it is served by the group-stage model with the
        population's mean mixture (`mean_mixture` [L, k], the mean of the trained users' mixtures).
        Stage base-chat: the bare backbone asked through its chat template (plan.BASE_CHAT)."""
        users = [u for u in self.users if getattr(u, split)]
        known = _PREFETCHED.get((stage, split))
        if known is not None and all(u.user_id in known for u in users):
            preds = known   # predicted with other virtual clients' users in one batch (client/virtual.py)
        else:
            preds = self.predictions(stage, population, group, split, mean_mixture)
        stats, n, user_scores = None, 0, {}
        for u in users:  # in the users' order, whatever order they were predicted in
            golds = [ex.output for ex in getattr(u, split)]
            stats = add_stats(stats, example_stats(self.spec, preds[u.user_id], golds))
            user_scores[u.user_id] = float(np.mean(per_example_scores(self.spec, preds[u.user_id], golds)))
            n += len(golds)
        return EvalResult(stats or {}, user_scores, n)

    def predictions(self, stage: str, population: dict | None, group: dict | None, split: str,
                    mean_mixture: torch.Tensor | None) -> dict[str, list[str]]:
        """Every user's predictions for its `split` items at `stage`: {user id: predictions}."""
        chat = stage == BASE_CHAT
        stage = "base" if chat else stage
        self._prepare(stage, population, group)
        users = [u for u in self.users if getattr(u, split)]
        routed = stage in ("group", "user") and uses_user_router(self.cfg)
        cold = [u for u in users if routed and not u.train]   # routed by the mean mixture, not an e_u
        warm = [u for u in users if u not in cold]
        preds = self._predict_each(warm, split) if stage == "user" else \
            self._predict_batched(stage, warm, split, chat=chat)
        preds.update(self._predict_no_history(cold, split, mean_mixture))
        return preds

    def _predict_each(self, users, split: str) -> dict[str, list[str]]:
        """Stage 3: every user with its own user LoRA, LoRA-aware router and e_u, yet many users per
        batch: each row computes with its user's part (ProperModel.user_parts), so the evaluation
        batches as stage 2's does instead of going user by user. USERS_PER_PASS bounds the
        stacked parts held at once (~3 MB a user for SmolLM2)."""
        self.model.set_stage("user")
        out = {}
        for s in range(0, len(users), USERS_PER_PASS):
            chunk = users[s:s + USERS_PER_PASS]
            parts = [read_user_adapter(self.model, self.store, u.user_id) for u in chunk]
            exs = [ex for u in chunk for ex in getattr(u, split)]
            emb = torch.stack([self._embedding(u) for u in chunk for _ in getattr(u, split)])
            rows = torch.tensor([i for i, u in enumerate(chunk) for _ in getattr(u, split)])
            with self.model.user_parts(parts):
                preds = predict(self.model, self.tokenizer, self.spec, exs, self.cfg, user_emb=emb, user_rows=rows)
            out.update(_by_user(chunk, split, preds))
        return out

    def _predict_batched(self, stage: str, users, split: str, chat: bool = False) -> dict[str, list[str]]:
        """One batched pass over everyone, routed per row in the group stage; chat: the prompts in
        the chat template (stage base-chat)."""
        if not users:
            return {}
        self.model.set_stage(stage)
        exs = [ex for u in users for ex in getattr(u, split)]
        emb = None
        if stage == "group" and uses_user_router(self.cfg):
            emb = torch.stack([self._embedding(u) for u in users for _ in getattr(u, split)])
        return _by_user(users, split, predict(self.model, self.tokenizer, self.spec, exs, self.cfg, user_emb=emb,
                                              chat=chat))

    def _predict_no_history(self, users, split: str, mean_mixture: torch.Tensor | None) -> dict[str, list[str]]:
        """Users with no history, at the group stage with the population's mean mixture. Without one
        (no group stage ran: its experts are no-ops) the router reads the users' seeded e_u."""
        if not users:
            return {}
        if mean_mixture is None:
            return self._predict_batched("group", users, split)
        self.model.set_stage("group")
        exs = [ex for u in users for ex in getattr(u, split)]
        with self.model.fixed_mixture(mean_mixture.float()):
            return _by_user(users, split, predict(self.model, self.tokenizer, self.spec, exs, self.cfg))


def _by_user(users, split: str, preds: list[str]) -> dict[str, list[str]]:
    """Predictions made for every user's `split` examples in order, cut back into each user's."""
    bounds = np.cumsum([0] + [len(getattr(u, split)) for u in users])
    return {u.user_id: preds[a:b] for u, a, b in zip(users, bounds[:-1], bounds[1:])}
