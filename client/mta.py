"""MTA on a client: what a client does with the users it holds (shared/method/mta.py has the algorithms).

  candidates   nominate its longest-history users as anchor candidates (federated bank building)
  train_anchor one LoRA on one anchor user's history (a fresh population-slot LoRA, train_population)
  personalize  per user: retrieve the top-k anchors of the bank with the user's own profile
               embedding, fold their weighted LoRAs into the backbone, train the stacked LoRA
  evaluate     "mta_merge" (retrieved + merged anchors only) or "mta" (merged + stacked LoRA)

Per user the UserStore keeps the stacked LoRA (a PEFT adapter directory, "<user>.mta_user/") and
one small file with the retrieved anchors' indices and weights ("<user>.mta.safetensors"); the
profile embedding is kept in memory only. `local_step` runs the server's part too, for
`proper local` (one client holding every user).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.data import user_seed
from client.predict import EvalResult
from client.runtime import config_of, reply, trainer_for
from shared.evaluation.evaluate import predict
from shared.evaluation.metrics import add_stats, example_stats, per_example_scores
from shared.method import mta as M
from shared.method.stages import train_population, train_user
from shared.runtime.persist import StateFileError, export_peft_adapter, import_peft_adapter

log = logging.getLogger("proper.mta")

STAGES = ("mta_merge", "mta")


class MTAClient:
    def __init__(self, trainer):
        self.t = trainer
        self.cfg, self.mcfg = trainer.cfg, M.mta_cfg(trainer.cfg)
        self.model, self.tokenizer = trainer.model, trainer.tokenizer
        self._emb: np.ndarray | None = None

    @property
    def users(self):
        return self.t.users

    def _bare(self):
        """The bare backbone: undo a population merge another method left in this process."""
        if self.model.merged:
            self.model.unmerge_population()

    def embeddings(self) -> np.ndarray:
        if self._emb is None:
            self._bare()
            self._emb = M.profile_embeddings(self.model, self.tokenizer, self.users, self.cfg)
        return self._emb

    def history(self) -> list[int]:
        return [len(u.train) for u in self.users]

    # ---- the bank
    def candidate_order(self) -> list[int]:
        """Users by history length, longest first (file order among equals): slot j = the j-th."""
        h = self.history()
        return sorted(range(len(h)), key=lambda i: -h[i])

    def candidates(self, n: int) -> tuple[np.ndarray, list[int]]:
        """The n longest-history users' embeddings and history lengths (no ids)."""
        order = self.candidate_order()[:max(0, n)]
        emb = self.embeddings()
        return emb[order] if order else emb[:0], [self.history()[i] for i in order]

    def train_anchor(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        """A fresh r = adapters.r_population LoRA trained on user `index`'s history alone."""
        self._bare()
        u = self.users[index]
        self.model.reset_part("population", seed=user_seed(self.cfg.seed, "anchor:" + u.user_id))
        res = train_population(self.model, self.tokenizer, [u], M.train_cfg(self.cfg, "anchor"),
                               seed=user_seed(self.cfg.seed, u.user_id))
        return res.shared, {**res.metrics, "num-examples": float(res.num_examples)}

    # ---- personalization
    def personalize(self, bank: M.Bank) -> dict[str, float]:
        """Retrieve, merge, and train the stacked LoRA of every user; store it privately."""
        emb = self.embeddings()
        cfg = M.train_cfg(self.cfg, "user")
        losses, seconds, t0 = [], 0.0, time.time()
        for i, u in enumerate(self.users):
            idx, w, _ = M.retrieve(emb[i], bank, int(self.mcfg.top_k), str(self.mcfg.weighting),
                                   float(self.mcfg.temperature))
            self._bare()
            with M.folded(self.model, [bank.loras[j] for j in idx], w):
                self.model.reset_part("group", seed=self.cfg.seed)  # experts B = 0: they add nothing
                m = train_user(self.model, self.tokenizer, u, torch.zeros(self.model.d_user), cfg,
                               seed=user_seed(self.cfg.seed, u.user_id))
                export_peft_adapter(self.model, "user", self._adapter_dir(u.user_id),
                                    base_model=f"{self.cfg.model.name} + merged MTA anchor LoRAs")
            self.t.store.save(u.user_id, "mta", {"anchors": torch.tensor(idx, dtype=torch.long),
                                                 "weights": torch.tensor(w, dtype=torch.float32)})
            losses.append(m["train_loss"])
            seconds += m["train_seconds"]
        return {"train_loss": float(np.nanmean(losses)), "train_seconds": seconds,
                "wall_seconds": time.time() - t0, "num_users": float(len(self.users))}

    def _adapter_dir(self, user_id: str):
        return self.t.store.path(user_id, "mta_user").with_suffix("")

    def retrieval(self, user_id: str) -> tuple[list[int], np.ndarray]:
        rec = self.t.store.load(user_id, "mta")
        if rec is None:
            raise StateFileError(f"no MTA retrieval stored for user {user_id!r} in {self.t.store.root}")
        return [int(i) for i in rec["anchors"]], rec["weights"].double().numpy()

    # ---- evaluation
    def evaluate(self, stage: str, bank: M.Bank, split: str = "test") -> EvalResult:
        if stage not in STAGES:
            raise ValueError(f"unknown MTA stage {stage!r}; expected one of {STAGES}")
        stats, n, scores = None, 0, {}
        for u in self.users:
            exs = getattr(u, split)
            if not exs:
                continue
            idx, w = self.retrieval(u.user_id)
            self._bare()
            with M.folded(self.model, [bank.loras[j] for j in idx], w):
                if stage == "mta":
                    self.model.reset_part("group", seed=self.cfg.seed)
                    self.model.reset_part("user", seed=0)
                    import_peft_adapter(self.model, "user", self._adapter_dir(u.user_id))
                    self.model.set_stage("user")
                else:
                    self.model.set_stage("population")
                preds = predict(self.model, self.tokenizer, self.t.spec, exs, self.cfg)
            golds = [ex.output for ex in exs]
            stats = add_stats(stats, example_stats(self.t.spec, preds, golds))
            scores[u.user_id] = float(np.mean(per_example_scores(self.t.spec, preds, golds)))
            n += len(golds)
        return EvalResult(stats or {}, scores, n)


# ---------------------------------------------------------------- proper local: server + client in one
def local_bank(mc: MTAClient) -> tuple[M.Bank, dict]:
    """Select anchors among all users (k-means of every profile embedding) and train their LoRAs."""
    t0 = time.time()
    emb, hist = mc.embeddings(), mc.history()
    n = int(mc.mcfg.anchors or M.default_anchors(len(hist)))
    chosen, labels = M.select_anchors(emb, hist, n, seed=int(mc.cfg.seed), center=bool(mc.mcfg.center),
                                      iters=int(mc.mcfg.kmeans_iters))
    t_embed = time.time() - t0
    loras, losses = [], []
    for i in chosen:
        state, m = mc.train_anchor(i)
        loras.append(state)
        losses.append(m["train_loss"])
    anchors = emb[chosen]
    bank = M.Bank(loras, anchors, M.build_center(anchors, bool(mc.mcfg.center)), [hist[i] for i in chosen])
    return bank, {"anchors": float(len(chosen)), "anchor_train_loss": float(np.nanmean(losses)),
                  "cluster_sizes": np.bincount(labels).tolist(), "embed_seconds": t_embed,
                  "seconds": time.time() - t0, "bank_bytes": float(bank.nbytes())}


def local_step(mc: MTAClient, what: str, bank: M.Bank | None, run) -> M.Bank:
    """One "mta:<what>" step of the plan in `proper local`; returns the bank."""
    if what == "bank":
        bank, m = local_bank(mc)
        bank.save(run.path / "mta_bank.safetensors")
        run.log({"kind": "train", "stage": "mta_bank", "round": 1, **m})
        log.info("MTA bank: %d anchors (cluster sizes %s), anchor loss %.3f (%.0f s)", len(bank),
                 m["cluster_sizes"], m["anchor_train_loss"], m["seconds"])
        return bank
    if what == "user":
        m = mc.personalize(bank)
        run.log({"kind": "train", "stage": "mta_user", "round": 1, **m})
        log.info("MTA stacked LoRAs: %d users, loss %.3f (%.0f s)", len(mc.users), m["train_loss"], m["wall_seconds"])
        return bank
    raise ValueError(f"unknown MTA step {what!r}")


# ---------------------------------------------------------------- the Flower ClientApp's MTA handlers
def for_trainer(trainer) -> MTAClient:
    """One MTAClient per ClientTrainer (the profile embeddings are computed once per process)."""
    mc = getattr(trainer, "_mta_client", None)
    if mc is None:
        mc = trainer._mta_client = MTAClient(trainer)
    return mc


def bank_in(msg) -> M.Bank:
    rec = msg.content.array_records.get("bank")
    if rec is None or len(rec) == 0:
        raise ValueError("an MTA message without the bank")
    return M.Bank.from_tensors(rec.to_torch_state_dict())


def evaluate_message(trainer, stage: str, msg, split: str) -> EvalResult:
    return for_trainer(trainer).evaluate(stage, bank_in(msg), split)


def register(app):
    """query.mta_candidates, train.mta_anchor, train.mta_user on the ClientApp (client_app.py)."""

    @app.query("mta_candidates")
    def mta_candidates(msg, context):
        """Nominate this client's `n` longest-history users: their profile embeddings and history
        lengths leave the client (no ids, no text); every other user's embedding stays here."""
        t = trainer_for(context, "mta")
        emb, hist = for_trainer(t).candidates(int(config_of(msg).get("n", 1)))
        arrays = ArrayRecord({"embeddings": torch.from_numpy(np.ascontiguousarray(emb, np.float32)),
                              "history": torch.tensor(hist, dtype=torch.long)})
        return reply(msg, {"num-users": len(t.users), "num-candidates": len(hist)}, {"candidates": arrays})

    @app.train("mta_anchor")
    def mta_anchor(msg, context):
        """Train one LoRA per requested candidate slot (slot j = this client's j-th longest history)."""
        t = trainer_for(context, "mta")
        mc = for_trainer(t)
        order = mc.candidate_order()
        arrays, losses, examples = {}, [], 0
        for slot in [int(s) for s in config_of(msg).get("slots", [])]:
            state, m = mc.train_anchor(order[slot])
            arrays[f"anchor.{slot}"] = ArrayRecord(state)
            losses.append(m["train_loss"])
            examples += int(m["num-examples"])
        metrics = {"num-examples": examples, "num-users": len(arrays),
                   "train_loss": float(np.mean(losses)) if losses else float("nan")}
        return reply(msg, metrics, arrays)

    @app.train("mta_user")
    def mta_user(msg, context):
        """Retrieve and merge with the bank, train each user's stacked LoRA; reply metrics only."""
        t = trainer_for(context, "mta")
        m = for_trainer(t).personalize(bank_in(msg))
        return reply(msg, {"num-examples": sum(len(u.train) for u in t.users), "num-users": len(t.users), **m})
