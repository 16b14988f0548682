"""`proper audit RUN`: leakage audits of a finished run (docs/decisions.md "Privacy").

On the machine that keeps the run (a `proper local` or `proper sim` run directory: the shared parts
and the clients' private state), it measures what the released models give away:

  canary exposure   for each canary of privacy.canaries (shared/data/canaries.py): the exposure of
                    its secret among `privacy.canaries.candidates` candidates sampled from the
                    10^digits possible ones (all of them where there are no more), by rank and
                    extrapolated (shared/evaluation/audit.py)
  membership AUC    the loss-threshold attack: a user's training items against its held-out (val)
                    items, pooled over users (canary items left out)

in each model a party holds after the run, and in the bare backbone (the reference: a secret the
backbone already favours is exposed without any leak):

  base              the backbone alone

  population        the population LoRA (the server; every client)
  group (mean)      the group part with the pool's mean mixture (the server's own view: it holds no
                    e_u); from the server's checkpoint, so simulated runs only
  group (own e_u)   the group part routed by the user's own e_u: the user's stage-2 model on its client,
                    and what anyone holding the shared group part gets with the right routing input
  user              the user's stage-3 model (its LoRA and LoRA-aware router): on its client only

Every item is scored in the run's training format: where the run retrieved (retrieval.k > 0), with
the items its query got there (shared/data/retrieval.py), in every view, the bare backbone's
included, so the views differ by their parameters alone. A member (training) item carries the items
it was trained with (its user's other training items, the canary copies its client added among
them), a held-out (val) item those its evaluation gave it. A canary's secret and candidates carry
the items the canary's prompt retrieves from its user's history as trained, the canary's copies
skipped: with them the secret itself would be in the prompt (another copy's label), and the audit
would measure copying from the prompt, not what the model keeps (with privacy.canaries.repeats = 1
these are the items the one copy was trained with).

Writes <run>/canaries.json (the canaries, derived from the config as every client derived them),
<run>/audit.json and <run>/audit.md.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from client.serving import locate
from client.trainer import get_model, initial_embedding, load_users, read_user_adapter
from shared.data.canaries import as_records, is_canary, run_canaries, secret_text, with_canaries
from shared.data.lamp import Example
from shared.data.retrieval import Profile, with_retrieval
from shared.data.tasks import User
from shared.evaluation.audit import example_losses, extrapolated_exposure, membership_auc, rank_exposure
from shared.method.plan import retrieval_k
from shared.runtime.persist import atomic_write_text, load_group, read_peft_adapter

log = logging.getLogger("proper.audit")

VIEWS = {"base": "anyone (the bare backbone: the reference)",
         "population": "server, every client", "group (mean)": "server (pool's mean mixture)",
         "group (own e_u)": "the user's client; anyone given its e_u", "user": "the user's client only"}
USERS_PER_PASS = 16


def _candidates(canary, m: int) -> list[int]:
    """m numbers of S without the secret, seeded by the canary (all of S but the secret where m >= |S| - 1)."""
    space = 10 ** canary.digits
    secret = int(canary.secret.replace(" ", ""))
    if m >= space - 1:
        return [n for n in range(space) if n != secret]
    rng = random.Random(f"{canary.user}:{canary.secret}")
    out = set()
    while len(out) < m:
        n = rng.randrange(space)
        if n != secret:
            out.add(n)
    return sorted(out)


class Views:
    """The run's models, put in place one view at a time on the process's backbone."""

    def __init__(self, place):
        self.place, self.cfg = place, place.cfg
        self.model, self.tokenizer = get_model(self.cfg)
        self.population = read_peft_adapter(self.model, "population", place.shared / "population_lora")
        self.has_group = (place.shared / "group.safetensors").is_file()
        self.mean_mixture = self._pool_mean()
        self._emb = {}

    def _pool_mean(self):
        from server.checkpoint import Checkpoint
        loaded = Checkpoint(self.place.shared).load()
        pool = None if loaded is None else loaded[1].get("mixtures")
        return None if pool is None or not len(pool) else pool.float().mean(0)

    def available(self) -> list[str]:
        out = ["base", "population"]
        if self.has_group:
            out += (["group (mean)"] if self.mean_mixture is not None else []) + ["group (own e_u)"]
        return out + ["user"]

    def store_of(self, user_id: str):
        for store in self.place.stores:
            if store.load(user_id, "embedding") is not None or store.path(user_id, "router").is_file():
                return store
        return None

    def has_user_stage(self, user_id: str) -> bool:
        store = self.store_of(user_id)
        return store is not None and store.path(user_id, "router").is_file()

    def embedding(self, user_id: str) -> torch.Tensor | None:
        if user_id not in self._emb:
            store = self.store_of(user_id)
            saved = None if store is None else store.load(user_id, "embedding")
            if saved is not None:
                self._emb[user_id] = saved["e_u"].float()
            elif store is not None:   # no group stage ran (OPPU, group.rounds=0): e_u stayed the seeded start
                self._emb[user_id] = initial_embedding(self.cfg.seed, user_id, self.model.d_user)
            else:
                self._emb[user_id] = None
        return self._emb[user_id]

    def set(self, view: str):
        m = self.model
        if view == "base":   # what the secrets' exposure is before any training on them
            if m.merged:
                m.unmerge_population()
            m.set_stage("base")
            return
        if view == "population":
            if m.merged:
                m.unmerge_population()
            m.load_part_state("population", self.population, source="population_lora")
            m.set_stage("population")
            return
        m.merge_population(self.population)
        if self.has_group:
            load_group(m, self.place.shared / "group.safetensors")
        else:
            m.reset_part("group", seed=self.cfg.seed)
        m.set_stage("user" if view == "user" else "group")

    def losses(self, view: str, per_user: dict[str, list[Example]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """user -> (summed NLL, mean NLL per token) of its examples under `view`; users without the
        private state the view needs are left out."""
        self.set(view)
        out = {}
        if view in ("base", "population", "group (mean)"):
            users = list(per_user)
            exs = [ex for u in users for ex in per_user[u]]
            with self.model.fixed_mixture(self.mean_mixture if view == "group (mean)" else None):
                total, mean = example_losses(self.model, self.tokenizer, exs, self.cfg)
            return _split(users, per_user, total, mean)
        users = [u for u in per_user if self.embedding(u) is not None]
        if view == "group (own e_u)":
            exs = [ex for u in users for ex in per_user[u]]
            emb = torch.stack([self.embedding(u) for u in users for _ in per_user[u]]) if exs else None
            total, mean = example_losses(self.model, self.tokenizer, exs, self.cfg, user_emb=emb)
            return _split(users, per_user, total, mean)
        for s in range(0, len(users), USERS_PER_PASS):   # user: each row with its user's own stage-3 part
            chunk = [u for u in users[s:s + USERS_PER_PASS] if self.store_of(u).path(u, "router").is_file()]
            if not chunk:
                continue
            parts = [read_user_adapter(self.model, self.store_of(u), u) for u in chunk]
            exs = [ex for u in chunk for ex in per_user[u]]
            emb = torch.stack([self.embedding(u) for u in chunk for _ in per_user[u]])
            rows = torch.tensor([i for i, u in enumerate(chunk) for _ in per_user[u]])
            with self.model.user_parts(parts):
                total, mean = example_losses(self.model, self.tokenizer, exs, self.cfg, user_emb=emb, rows=rows)
            out.update(_split(chunk, per_user, total, mean))
        return out


def _split(users, per_user, total, mean) -> dict:
    bounds = np.cumsum([0] + [len(per_user[u]) for u in users])
    return {u: (total[a:b], mean[a:b]) for u, a, b in zip(users, bounds[:-1], bounds[1:])}


def audited_items(cfg, spec, users, canaries, candidates: dict[str, list[int]]):
    """(canary items per canary user: the secret first, then its candidates; the held users' (training,
    val) items), encoded as the run's clients encoded them (module docstring): with their retrieved
    items where retrieval.k > 0, none where it is 0."""
    k = retrieval_k(cfg)
    contexts = {c.user: None for c in canaries}
    if k > 0:
        # the histories the clients trained on: the canary copies among their users' items
        histories = {u.user_id: u for u in with_canaries(users, canaries)}
        for c in canaries:   # ranked in that history, the canary's copies skipped
            mine = histories[c.user]
            copies = [i for i, ex in enumerate(mine.train) if is_canary(ex)]
            contexts[c.user] = Profile(mine, spec, k).context(c.input, skip=copies)
        users = [User(u.user_id, [ex for ex in u.train if not is_canary(ex)], u.val, u.test)
                 for u in with_retrieval(list(histories.values()), spec, k)]
    canary_items = {c.user: [Example(f"{c.user}/canary", c.user, c.input, c.secret, contexts[c.user])] +
                    [Example(f"{c.user}/cand{n}", c.user, c.input, secret_text(n, c.digits), contexts[c.user])
                     for n in candidates[c.user]]
                    for c in canaries}
    held = {u.user_id: (u.train, u.val) for u in users if u.train and u.val}
    return canary_items, held


def run_audit(run_path: str | Path, candidates: int | None = None) -> dict:
    """`candidates`: per canary, how many of the other secrets it is ranked among (None: the run's
    privacy.canaries.candidates). The canaries themselves are the run's, whatever the count."""
    t0 = time.time()
    place = locate(run_path)
    cfg = place.cfg
    run = Path(run_path)
    spec, users = load_users(cfg)
    canaries = run_canaries(cfg, users)
    atomic_write_text(run / "canaries.json", json.dumps(as_records(canaries), indent=1) + "\n")
    views = Views(place)
    m = int(cfg.privacy.canaries.candidates if candidates is None else candidates)
    if m < 1:
        raise ValueError(f"proper audit {run}: --candidates must be at least 1, not {m}")
    cand = {c.user: _candidates(c, m) for c in canaries}
    canary_items, held = audited_items(cfg, spec, users, canaries, cand)
    if cfg.eval.clients is not None:
        # a study at scale evaluated (and trained stage 3 on) a fixed sample of clients: membership is
        # measured on those users, in every view alike; a canary outside the sample has no user view
        held = {u: v for u, v in held.items() if views.has_user_stage(u)}
        log.info("eval.clients: membership measured on the %d sampled users with a stage-3 model", len(held))
    results = {}
    for view in views.available():
        t = time.time()
        r = {"held_by": VIEWS[view], "canaries": []}
        scored = views.losses(view, canary_items) if canaries else {}
        for c in canaries:
            if c.user not in scored:
                continue
            total = scored[c.user][0]
            rank, exp = rank_exposure(float(total[0]), total[1:], 10 ** c.digits)
            r["canaries"].append({"user": c.user, "rank": rank, "exposure": exp,
                                  "extrapolated_exposure": extrapolated_exposure(float(total[0]), total[1:]),
                                  "candidates": len(total) - 1, "space": 10 ** c.digits,
                                  "secret_nll": float(total[0]), "candidate_nll_mean": float(np.mean(total[1:]))})
        if r["canaries"]:
            r["exposure"] = float(np.mean([x["exposure"] for x in r["canaries"]]))
            r["extrapolated_exposure"] = float(np.mean([x["extrapolated_exposure"] for x in r["canaries"]]))
        member = views.losses(view, {u: tr for u, (tr, _) in held.items()})
        nonmember = views.losses(view, {u: va for u, (_, va) in held.items()})
        both = [u for u in held if u in member and u in nonmember]
        a = np.concatenate([member[u][1] for u in both]) if both else np.zeros(0)
        b = np.concatenate([nonmember[u][1] for u in both]) if both else np.zeros(0)
        r.update({"membership_auc": membership_auc(a, b), "members": int(len(a)), "nonmembers": int(len(b)),
                  "users": len(both), "member_loss": float(a.mean()) if len(a) else math.nan,
                  "nonmember_loss": float(b.mean()) if len(b) else math.nan, "seconds": time.time() - t})
        results[view] = r
        log.info("audit %-16s exposure %s  membership AUC %.3f  (%.0f s)", view,
                 f"{r['exposure']:.2f}" if "exposure" in r else "-", r["membership_auc"], time.time() - t)
    out = {"run": str(run), "task": spec.name, "canaries": as_records(canaries), "candidates": m,
           "views": results, "seconds": time.time() - t0}
    privacy = _privacy_record(run)
    if privacy is not None:
        out["privacy"] = privacy
    atomic_write_text(run / "audit.json", json.dumps(out, indent=1, default=float) + "\n")
    table = audit_table(out)
    atomic_write_text(run / "audit.md", table + "\n")
    print(table, flush=True)
    return out


def _privacy_record(run: Path) -> dict | None:
    """The run's {"kind": "privacy"} record from rounds.jsonl (epsilon per stage), where there is one."""
    path = run / "rounds.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "privacy":
            found = rec
    return found


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def audit_table(audit: dict) -> str:
    n = len(audit["canaries"])
    lines = ["| model | held by | canary exposure (rank) | extrapolated | membership AUC | members / held-out |",
             "|---|---|---|---|---|---|"]
    for view, r in audit["views"].items():
        lines.append(f"| {view} | {r['held_by']} | {_num(r.get('exposure'))} | {_num(r.get('extrapolated_exposure'))} "
                     f"| {_num(r['membership_auc'], '{:.3f}')} | {r['members']} / {r['nonmembers']} |")
    if n:
        c = audit["canaries"][0]
        space = 10 ** c["digits"]
        lines.append("")
        lines.append(f"- {n} canaries of {c['digits']} digits (|S| = {space}, at most {math.log2(space):.1f} bits), "
                     f"each repeated {c['repeats']} times in its user's history; exposure = log2 |S| - log2 rank "
                     f"among {min(audit['candidates'], space - 1)} sampled candidates (resolution "
                     f"{math.log2(min(audit['candidates'], space - 1) + 1):.1f} bits), mean over canaries; "
                     "extrapolated: -log2 P(X <= x) of a normal fitted to the candidates' log-perplexities")
    else:
        lines += ["", "- no canaries (privacy.canaries.users = 0): membership inference only"]
    lines.append("- membership AUC: loss-threshold attack, the users' training items against their held-out "
                 "(val) items, pooled; 0.5 = chance")
    p = audit.get("privacy")
    if p is not None:
        lines.append("- privacy.dp: " + (f"epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g}" if p.get("dp")
                                         else "off"))
    return "\n".join(lines)
