"""The signature start's clustering as sums over clients: what a federation computes
(group.assign_start=signature in `proper sim` / `proper server`; the hook: shared/method/signature_start.py).

The server holds the centroids (the kinds of input) and the k answer maps; a client holds its
users' item readings and counts. Per round a client returns sums over its own users only:
  read    the sum of its item readings and, per answer, their sum and count (the centroids' start)
  codes   per kind of input, the sum and count of its unit-centred readings nearest that centroid
  em      per restart and map, its users' counts weighted by their responsibilities, the
          responsibilities' sum and the users' log-likelihood
and the server's update is k-means' and EM's own: a sum over clients is the sum over users, so a
federation computes what one client holding every user computes from the same start (tested).
Each user's group is decided on its client; docs/decisions.md says what the server learns. Free-text
answers would need a second federated quantiser: a federation refuses them (refuse_in_federation).
The rounds over messages: server/signature_rounds.py and client/signature_replies.py.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from shared.method.answer_signatures import smoothing_of

KMEANS_ROUNDS = 10      # Lloyd iterations of the codes
EM_ROUNDS = 100         # EM iterations at most: it stops once converged, as the centralized fit does
EM_RESTARTS = 10        # random starts fitted side by side, the best kept by likelihood
EM_TOL = 1e-6           # converged: no start's log-likelihood moved by more than this fraction in a round


def em_converged(before: torch.Tensor | None, now: torch.Tensor) -> bool:
    """Whether EM has converged: every start's log-likelihood [R] within EM_TOL (relative) of the
    previous round's, as the centralized fit stops (a fixed number of rounds stopped short of it:
    docs/results/groups.md, Session 15)."""
    return before is not None and bool(((now - before).abs() <= EM_TOL * now.abs().clamp_min(1.0)).all())


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
    returns each client's users' groups. What server/signature_rounds.py and client/signature_replies.py do over
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
