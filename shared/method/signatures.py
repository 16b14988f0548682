"""Answer signatures: a start for the group stage's assignment from what each user answers to what.

A group is a way of answering: users of one group give the same answer to the same kind of input
(docs/results/groups.md). The group stage's own assignment by loss (constraint_form=assign, IFCA)
starts from a random draw while its experts are still identical, and a random start meets the
clustering's local optima. group.assign_start=signature starts it from a clustering instead:

  1. every training item is read by the population model (W_p merged, the model the group stage
     starts from): its last hidden state averaged over the item's input tokens;
  2. those item vectors are quantised into `codes` kinds of input (k-means over all items, best of
     several restarts): on synthetic users the codes recover the item's theme (item ARI 0.8-0.9);
  3. a user's signature counts its (kind of input, answer) pairs, one cell per pair; the answer is
     the answer string itself (label tasks) or, where answers are free text, a code of the answer
     tokens' hidden states, quantised the same way;
  4. the users are clustered into k groups by those counts: a mixture of k answer maps, each a
     distribution of answers per kind of input under a prior of group.signature_prior times the
     items per cell (smoothing_of), fitted by EM (best of several restarts by likelihood). A user
     of a few items shares few cells with the others of its group, which defeats k-means on the
     count vectors (ARI 0.23-0.52 against EM's 0.71-0.77 with the true themes, 60 users in 5
     groups: docs/results/groups.md, "Session 11"); the mixture instead scores each item against
     each group's map.

In a federation (`proper sim`, `proper server`) the same clustering runs as rounds of sufficient
statistics (below, "federated"; server/signatures.py, client/signature.py): step 2 becomes k-means
whose centroids the server updates from each client's per-code sums, step 4 EM whose maps it
updates from each client's responsibility-weighted counts. Each client reads and counts only its
own users' items, and each user's group is decided on its client; docs/decisions.md says what the
server learns from these rounds. Free-text answers (generation tasks) would need a second federated
quantiser: a federation refuses the signature start there.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from shared.data.canaries import is_canary
from shared.data.encode import encode_users, make_batches
from shared.method.mta import kmeans
from shared.method.plan import uses_assignment

log = logging.getLogger(__name__)


def refuse_in_federation(cfg, spec=None) -> None:
    """A federation clusters label answers only: free-text answers (generation tasks) are quantised
    by a k-means over every user's answers, which the federated rounds do not do."""
    if OmegaConf.select(cfg, "group.assign_start", default="random") == "signature" and \
            spec is not None and spec.kind == "generation":
        from shared.runtime.config import ConfigError
        raise ConfigError(f"group.assign_start=signature in a federation needs a task with a closed answer set; "
                          f"{spec.name} answers in free text (its answers are clustered in one process only): "
                          "use `proper local`, or group.assign_start=random (docs/decisions.md)")


def best_kmeans(x: np.ndarray, k: int, seed: int, restarts: int) -> np.ndarray:
    """k-means labels, the best of `restarts` k-means++ starts by inertia (deterministic per seed)."""
    best = None
    for r in range(restarts):
        labels, cent = kmeans(x, k, seed=seed * 1009 + r)
        inertia = float(((x - cent[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    return best[1]


def without_canaries(users):
    """The users with their canary copies (privacy.canaries) left out: a planted secret is no way of answering."""
    return [replace(u, train=[x for x in u.train if not is_canary(x)]) for u in users]


def _unit_centred(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x - x.mean(0), dim=1).double().numpy()


@torch.no_grad()
def item_readings(model, tokenizer, users, max_len: int):
    """Per training item, in `users` order: (mean last hidden state over its input tokens [N, H],
    over its answer tokens [N, H], its user's index [N]). The model reads as the population model."""
    items = encode_users(tokenizer, users, max_len)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))   # make_batches' order
    model.set_stage("population")
    inp, ans, who = [], [], []
    for ids, mask, labels, uidx in make_batches(items, 16, tokenizer.pad_token_id, None):
        hidden = model.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        a = (labels != -100).float()
        i = mask.float() * (1 - a)
        inp.append((hidden * i.unsqueeze(-1)).sum(1) / i.sum(1, keepdim=True).clamp_min(1))
        ans.append((hidden * a.unsqueeze(-1)).sum(1) / a.sum(1, keepdim=True).clamp_min(1))
        who.append(uidx)
    back = torch.empty(len(items), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(items))
    return torch.cat(inp)[back], torch.cat(ans)[back], torch.cat(who)[back]


def answer_signatures(model, tokenizer, users, max_len: int, codes: int, seed: int, labels: bool,
                      restarts: int = 10) -> torch.Tensor:
    """[U, codes, answers]: each user's counts of (kind of input, answer) pairs. labels: the task's
    answers form a closed set (label and rating tasks), counted as they are; else (generation) the
    answers are quantised into `codes` codes like the inputs. Canary copies (privacy.canaries) are
    left out: a planted secret is no way of answering."""
    users = without_canaries(users)
    inp, ans, who = item_readings(model, tokenizer, users, max_len)
    sig_users = len(users)
    if not len(who):
        return torch.zeros(sig_users, codes, 1)
    kinds = torch.as_tensor(best_kmeans(_unit_centred(inp), codes, seed, restarts))
    outputs = [x.output for u in users for x in u.train]
    if labels:
        distinct = sorted(set(outputs))
        answer = torch.tensor([distinct.index(o) for o in outputs])
        n_answers = len(distinct)
    else:
        answer = torch.as_tensor(best_kmeans(_unit_centred(ans), codes, seed + 1, restarts))
        n_answers = codes
    sig = torch.zeros(sig_users, codes * n_answers)
    sig.index_put_((who, kinds * n_answers + answer), torch.ones(len(who)), accumulate=True)
    return sig.view(sig_users, codes, n_answers)


def smoothing_of(prior: float, items: float, cells: int) -> float:
    """The pseudo-counts added to each cell of an answer map (k maps of kinds x answers cells): `prior`
    times the items per cell on average. Fixed pseudo-counts weigh more the fewer items there are:
    on 24 items in 2 groups (tests/test_signatures.py) 0.5 per cell makes both maps alike and EM puts
    every user in one group, while 0.1 per cell left 5 synthetic groups of 150 users less well separated
    than 0.5 (docs/decisions.md, "The answer maps' prior")."""
    if prior <= 0:
        raise ValueError("the answer maps need a prior > 0 (an unseen cell would have log 0)")
    return prior * max(float(items), 1.0) / cells


def answer_maps(counts: torch.Tensor, k: int, seed: int, restarts: int = 20, iters: int = 100, *,
                prior: float) -> torch.Tensor:
    """[U] each user's cluster under a mixture of k answer maps fitted to counts [U, kinds, answers]
    by EM: a map is p(answer | kind), smoothed by pseudo-counts in every cell (smoothing_of); a user's
    log-likelihood under a map sums its items' log p. Best of `restarts` random starts (seeded) by
    the data's log-likelihood."""
    smoothing = smoothing_of(prior, float(counts.sum()), k * counts.shape[1] * counts.shape[2])
    c = counts.double()
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        resp = torch.rand(len(c), k, generator=gen, dtype=torch.float64)
        resp = resp / resp.sum(1, keepdim=True)
        for _ in range(iters):
            maps = torch.einsum("uc,uia->cia", resp, c) + smoothing
            maps = maps / maps.sum(-1, keepdim=True)
            ll = torch.einsum("uia,cia->uc", c, maps.log()) + resp.mean(0).clamp_min(1e-12).log()
            new = torch.softmax(ll, 1)
            if torch.allclose(new, resp, atol=1e-8):
                break
            resp = new
        total = float(torch.logsumexp(ll, 1).sum())
        if best is None or total > best[0]:
            best = (total, ll.argmax(1))
    return best[1].long()


def signature_groups(model, tokenizer, users, max_len: int, k: int, codes: int, seed: int, labels: bool,
                     prior: float, restarts: int = 20) -> torch.Tensor:
    """[U] each user's group (0..k-1) from its answer signature: the assignment's start. A group the
    mixture leaves empty is logged: under group.reassign=false its expert gets no user."""
    groups = answer_maps(answer_signatures(model, tokenizer, users, max_len, codes, seed, labels), k, seed, restarts,
                         prior=prior)
    empty = [e for e in range(k) if not (groups == e).any()]
    if empty:
        log.warning("answer signatures: no user in group(s) %s of k=%d; their experts get no assigned user", empty, k)
    return groups


# ---- the same clustering, federated: rounds of sufficient statistics
# The server holds the centroids (the kinds of input) and the k answer maps; a client holds its
# users' item readings and counts. Per round a client returns sums over its own users only:
#   read    the sum of its item readings and, per answer, their sum and count (the centroids' start)
#   codes   per kind of input, the sum and count of its unit-centred readings nearest that centroid
#   em      per restart and map, its users' counts weighted by their responsibilities, the
#           responsibilities' sum and the users' log-likelihood
# and the server's update is k-means' and EM's own: a sum over clients is the sum over users, so a
# federation computes what one client holding every user computes from the same start (tested).
KMEANS_ROUNDS = 10      # Lloyd iterations of the codes
EM_ROUNDS = 100         # EM iterations at most: it stops once converged, as the centralized fit does
EM_RESTARTS = 10        # random starts fitted side by side, the best kept by likelihood
EM_TOL = 1e-6           # converged: no start's log-likelihood moved by more than this fraction in a round


def em_converged(before: torch.Tensor | None, now: torch.Tensor) -> bool:
    """Whether EM has converged: every start's log-likelihood [R] within EM_TOL (relative) of the
    previous round's. A fixed 30 rounds left 5 groups of 150 users short of it (ARI 0.659 where
    the converged fit gives 0.708: docs/results/groups.md, Session 15)."""
    return before is not None and bool(((now - before).abs() <= EM_TOL * now.abs().clamp_min(1.0)).all())


def uses_signature_start(cfg) -> bool:
    """Whether a run's group stage starts its assignment from the signatures: only where there is an
    assignment to start (group.constraint_form=assign with the user-aware router; client/trainer.py)."""
    return cfg.group.get("assign_start", "random") == "signature" and uses_assignment(cfg)


def check_answers(stats: dict, least: float = 0.5):
    """Refuse a signature start whose answers are mostly outside the task's closed answer set (e.g.
    LaMP_1's titles, or a data set whose labels differ from the task's): the users' counts would be
    all zeros and every user would land in one group."""
    items, known = float(stats["count"].sum()), float(stats["answer_count"].sum())
    if items and known < least * items:
        raise ValueError(f"group.assign_start=signature: only {known:.0f} of {items:.0f} training answers are in "
                         f"the task's answer set, too few to group users by: use group.assign_start=random "
                         "(docs/decisions.md)")


def answer_index(spec, outputs) -> torch.Tensor:
    """Each output's index in the task's closed answer set (shared by every client), -1 if not in it."""
    index = {label: i for i, label in enumerate(spec.labels)}
    return torch.tensor([index.get(str(o).strip().lower(), -1) for o in outputs], dtype=torch.long)


def unit_centred(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double() - mean.double(), dim=1)


def nearest(unit: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N] the nearest centroid of each row (Euclidean, as k-means)."""
    if not len(unit):
        return torch.zeros(0, dtype=torch.long)
    return torch.cdist(unit, centroids.double()).argmin(1)


def read_stats(readings: torch.Tensor, answers: torch.Tensor, n_answers: int) -> dict:
    """A client's first reply: the readings' sum and count, and per answer their sum and count."""
    h = readings.shape[1]
    keep = answers >= 0
    by_answer = torch.zeros(n_answers, h, dtype=torch.float64).index_add_(0, answers[keep], readings[keep].double())
    return {"sum": readings.double().sum(0), "count": torch.tensor([float(len(readings))], dtype=torch.float64),
            "answer_sum": by_answer,
            "answer_count": torch.bincount(answers[keep], minlength=n_answers).double()}


def first_centroids(stats: dict, codes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean reading, centroids [codes, H]) from the clients' summed read_stats: each answer's mean
    reading, unit-centred, the most frequent answers first; seeded random unit vectors where there
    are fewer answers with items than codes."""
    mean = stats["sum"] / stats["count"].clamp_min(1)
    counts = stats["answer_count"]
    order = [int(i) for i in torch.argsort(counts, descending=True, stable=True) if counts[i] > 0][:codes]
    cents = unit_centred(stats["answer_sum"][order] / counts[order].view(-1, 1), mean) if order else \
        torch.zeros(0, mean.shape[0], dtype=torch.float64)
    if len(cents) < codes:
        gen = torch.Generator().manual_seed(seed)
        extra = F.normalize(torch.randn(codes - len(cents), mean.shape[0], generator=gen, dtype=torch.float64), dim=1)
        cents = torch.cat([cents, extra])
    return mean, cents


def code_stats(unit: torch.Tensor, centroids: torch.Tensor) -> dict:
    """Per centroid, the sum and count of the rows nearest it, and their squared distances' sum."""
    c = centroids.double()
    near = nearest(unit, c)
    sums = torch.zeros_like(c).index_add_(0, near, unit)
    inertia = ((unit - c[near]) ** 2).sum() if len(unit) else torch.zeros((), dtype=torch.float64)
    return {"sum": sums, "count": torch.bincount(near, minlength=len(c)).double(), "inertia": inertia.view(1)}


def next_centroids(stats: dict, centroids: torch.Tensor) -> torch.Tensor:
    """Lloyd's update from the summed code_stats; a centroid no row chose stays where it was."""
    n = stats["count"].view(-1, 1)
    return torch.where(n > 0, stats["sum"] / n.clamp_min(1), centroids.double())


def user_counts(codes: torch.Tensor, answers: torch.Tensor, who: torch.Tensor, n_users: int, n_codes: int,
                n_answers: int) -> torch.Tensor:
    """[U, codes, answers] each user's (kind of input, answer) counts."""
    keep = answers >= 0
    sig = torch.zeros(n_users, n_codes * n_answers, dtype=torch.float64)
    sig.index_put_((who[keep], codes[keep] * n_answers + answers[keep]),
                   torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    return sig.view(n_users, n_codes, n_answers)


def random_responsibilities(keys: list[str], restarts: int, k: int, seed: int) -> torch.Tensor:
    """[R, U, k] a seeded random start per user, drawn from the user's own key (its id, which never
    leaves the client): the same whichever client holds the user, so a federation starts where one
    client holding every user starts."""
    import zlib
    out = torch.empty(restarts, len(keys), k, dtype=torch.float64)
    for u, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        out[:, u] = torch.rand(restarts, k, generator=gen, dtype=torch.float64)
    return out / out.sum(-1, keepdim=True)


def em_responsibilities(counts: torch.Tensor, log_maps: torch.Tensor, log_prior: torch.Tensor):
    """E-step: ([R, U, k] responsibilities, [R] the users' log-likelihood) under R sets of k maps."""
    ll = torch.einsum("uia,rcia->ruc", counts, log_maps) + log_prior.unsqueeze(1)
    return torch.softmax(ll, -1), torch.logsumexp(ll, -1).sum(1)


def em_stats(counts: torch.Tensor, resp: torch.Tensor, loglik: torch.Tensor | None = None) -> dict:
    """A client's EM reply: responsibility-weighted counts [R, k, codes, answers], mass [R, k]."""
    r = resp.shape[0]
    return {"counts": torch.einsum("ruc,uia->rcia", resp, counts), "mass": resp.sum(1),
            "loglik": torch.zeros(r, dtype=torch.float64) if loglik is None else loglik}


def em_maps(stats: dict, map_prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step from the summed em_stats: (log maps [R, k, codes, answers], log prior [R, k], the
    mixture's weights); each map cell gets smoothing_of(map_prior, the users' items, cells)
    pseudo-counts, as in the centralized fit."""
    counts = stats["counts"]
    maps = counts + smoothing_of(map_prior, float(counts[0].sum()), counts[0].numel())
    prior = stats["mass"] / stats["mass"].sum(-1, keepdim=True).clamp_min(1e-12)
    return (maps / maps.sum(-1, keepdim=True)).log(), prior.clamp_min(1e-12).log()


def federated_answer_maps(client_counts: list[tuple[list[str], torch.Tensor]], k: int, seed: int, prior: float,
                          rounds: int = EM_ROUNDS, restarts: int = EM_RESTARTS) -> list[torch.Tensor]:
    """The federated EM in one process, for tests and benches: clients given as (user keys, counts);
    returns each client's users' groups. What server/signatures.py and client/signature.py do over
    messages, step for step."""
    def summed(replies):
        return {key: sum(r[key] for r in replies) for key in replies[0]}
    stats = summed([em_stats(c, random_responsibilities(keys, restarts, k, seed)) for keys, c in client_counts])
    before = None
    for _ in range(rounds):
        log_maps, log_prior = em_maps(stats, prior)
        stats = summed([em_stats(c, *em_responsibilities(c, log_maps, log_prior)) for _, c in client_counts])
        if em_converged(before, stats["loglik"]):
            break
        before = stats["loglik"]
    best = int(stats["loglik"].argmax())   # ranked under the maps it was measured with: the last sent
    return [em_responsibilities(c, log_maps[best:best + 1], log_prior[best:best + 1])[0][0].argmax(-1)
            for _, c in client_counts]
