"""A client: the users it holds and what it does for each stage; the Flower ClientApp and `proper
local` (one client holding every user) both call this.

The client is split by role, as PEFT splits config / model / layer:
  client/model.py     the model: one backbone with PROPER's adapters per process
  client/data.py      the data: its users, and what is seeded per user
  client/store.py     the private store: e_u, user LoRAs, what was sent (its own disk)
  client/trainer.py   ClientTrainer: the state each stage starts from, stage 1 and stage 3
  client/group.py     stage 2's client side; client/release.py what its reply releases
  client/predict.py   every stage's evaluation

Everything private stays in the client's store: the users' embeddings e_u (stage 2), their LoRAs
and LoRA-aware routers (stage 3). Replies carry only the shared parts (population LoRA, or experts +
routers), counts, routing mass, anonymous shuffled mixtures and metrics.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from client import group as G
from client import predict as P
from client.data import expert_embedding, initial_embedding, load_users, user_seed
from client.model import get_model
from client.release import Release
from client.store import (
    embedding,
    export_shared_parts,
    load_user_adapter,
    read_user_adapter,
    save_user_adapter,
)
from shared.data.canaries import run_canaries, with_canaries
from shared.data.retrieval import with_retrieval
from shared.method.plan import retrieval_k
from shared.method.stages import RoundResult, train_population, train_user
from shared.runtime.config import stage_cfg, to_yaml
from shared.runtime.persist import UserStore, atomic_write_text

# names other code imports from here (the client's public surface before the split)
__all__ = ["ClientTrainer", "EvalResult", "round_cfg", "get_model", "load_users", "user_seed", "initial_embedding",
           "expert_embedding", "save_user_adapter", "load_user_adapter", "read_user_adapter",
           "export_shared_parts"]

DATA_PATH = "data_path.txt"   # a deployed client's state directory: where its users' LaMP files are
EvalResult = P.EvalResult
round_cfg = G.round_cfg
log = logging.getLogger(__name__)


class ClientTrainer:
    def __init__(self, cfg: DictConfig, spec, users, state_dir: str, client_seed: int = 0, keep_shared: bool = False,
                 *, federated: bool = False, store=None, data_path: str | None = None):
        """keep_shared: a deployed client keeps the run's final shared parts beside its users' state, to
        serve them and enroll new users later (client/serving.py); simulated clients share the run's copy.
        federated: its users' signature groups come from the server's rounds, never from clustering its
        own users alone (each client would number them its own way). store: where the users' private
        state is read and written (default: a UserStore at state_dir). data_path: the LaMP files its
        users were read from, written beside the kept shared parts (DATA_PATH) so that serving finds
        their histories there (client/serving.py, retrieval.k > 0)."""
        if not users:
            raise ValueError("a client needs at least one user")
        # privacy.canaries: the canary items of this client's chosen users, added here, on the client
        # that holds them (shared/data/canaries.py); nothing about them is sent
        self.canaries = [c for c in run_canaries(cfg, users) if c.user in {u.user_id for u in users}]
        if self.canaries:
            users = with_canaries(users, self.canaries)
        # retrieval.k > 0 or method=rag: each query's top items of its user's own history, ranked here,
        # on the client that holds the user (shared/data/retrieval.py; docs/decisions.md "Retrieval")
        users = with_retrieval(users, spec, retrieval_k(cfg))
        self.cfg, self.spec, self.users = cfg, spec, users
        # users with a history train; one with none (an empty profile) is only evaluated
        self.trained = [u for u in users if u.train]
        self.no_history = [u for u in users if not u.train]
        if self.no_history:
            log.warning("%d user(s) with no history (%s%s): skipped in training, evaluated with the population "
                        "and group stages and the population's mean mixture", len(self.no_history),
                        ", ".join(u.user_id for u in self.no_history[:3]), ", ..." if len(self.no_history) > 3 else "")
        self.store = store if store is not None else UserStore(state_dir)
        self.keep_shared = keep_shared
        self.data_path = data_path
        self.federated = federated
        self.seed = cfg.seed * 1_000_003 + client_seed
        self.switches = G.GroupSwitches.of(cfg)
        self.release = Release.of(cfg, self.seed)
        self.model, self.tokenizer = get_model(cfg)
        # an experiment hook, set by bench/group_ablation.py only and kept in memory only: user id ->
        # the expert group.constraint_form=assign starts from, in place of the seeded hash
        self.assign_start: dict[str, int] | None = None
        self._signature_start: torch.Tensor | None = None     # group.assign_start=signature, once computed

    # ---- putting the model in the state a stage starts from
    def prepare(self, stage: str, population=None, group=None):
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

    def user_embedding(self, user, for_round: int | None = None) -> torch.Tensor:
        """e_u: the latest, or the one a group round `for_round` starts from. Each save keeps the
        value from before that round too, so a round redone after a crash starts where it did."""
        return embedding(self.store, user.user_id, self.cfg.seed, self.model.d_user, for_round)

    def initial(self, part: str, population: dict | None = None) -> dict[str, torch.Tensor]:
        """The starting point of a server-coordinated part, as every client would build it (seeded
        by the run's seed alone): a server needs it to take a server learning-rate step."""
        self.prepare("population" if part == "population" else "group", population)
        return self.model.part_state(part)

    def untrained(self, part: str) -> RoundResult:
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
        self.prepare("population", population)
        if not self.trained:
            return self.untrained("population")
        return train_population(self.model, self.tokenizer, self.trained,
                                round_cfg(self.cfg, "population", server_round), seed=self.seed + server_round)

    # ---- stage 2 (client/group.py)
    def group(self, population: dict, group: dict | None, others: torch.Tensor | None,
              server_round: int) -> RoundResult:
        return G.group_round(self, population, group, others, server_round)

    def initial_mixtures(self, population: dict, group: dict | None) -> torch.Tensor:
        """The users' mixtures under the group part round 1 starts from, with their starting e_u
        (shuffled, no ids): the first pool for the constraint loss. Nothing is trained."""
        return G.first_pool(self, population, group)

    # ---- stage 3
    def user(self, population: dict, group: dict | None) -> dict[str, float]:
        self.prepare("user", population, group)
        if self.keep_shared:  # the final shared parts: train.user is the last message that carries them
            export_shared_parts(self.model, self.store.root, group is not None, self.cfg.model.name,
                                to_yaml(self.cfg))
            if self.data_path is not None:   # the run's data.path is the server's, not this client's files
                atomic_write_text(Path(self.store.root) / DATA_PATH, f"{Path(self.data_path).resolve()}\n")
        cfg = stage_cfg(self.cfg, "user")
        losses, seconds, t0, last = [], 0.0, time.time(), time.time()
        for i, u in enumerate(self.trained, 1):
            m = train_user(self.model, self.tokenizer, u, self.user_embedding(u), cfg,
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

    # ---- evaluation of any stage on these users (client/predict.py)
    def evaluate(self, stage: str, population: dict | None = None, group: dict | None = None,
                 split: str = "test", mean_mixture: torch.Tensor | None = None) -> EvalResult:
        """Every user with `split` items, at `stage`. A user with no history has no e_u and no user
        LoRA: in the group and user stages it is served by the group-stage model with the
        population's mean mixture (`mean_mixture` [L, k], the mean of the trained users' mixtures).
        Stage base-chat: the bare backbone asked through its chat template (plan.BASE_CHAT)."""
        return P.evaluate(self, stage, population, group, split, mean_mixture)

    def predictions(self, stage: str, population: dict | None, group: dict | None, split: str,
                    mean_mixture: torch.Tensor | None) -> dict[str, list[str]]:
        """Every user's predictions for its `split` items at `stage`: {user id: predictions}."""
        return P.predictions(self, stage, population, group, split, mean_mixture)
