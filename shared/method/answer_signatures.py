"""Answer signatures, in one process holding every user: the signature start's clustering
(group.assign_start=signature; the hook and its knobs: shared/method/signature_start.py).

  1. every training item is read by the population model (W_p merged, the model the group stage
     starts from): its last hidden state averaged over the item's input tokens;
  2. those item vectors are quantised into `codes` kinds of input (k-means over all items, best of
     several restarts): on synthetic users the codes recover the item's theme (docs/results/groups.md);
  3. a user's signature counts its (kind of input, answer) pairs, one cell per pair; the answer is
     the answer string itself (label tasks) or, where answers are free text, a code of the answer
     tokens' hidden states, quantised the same way;
  4. the users are clustered into k groups by those counts: a mixture of k answer maps, each a
     distribution of answers per kind of input under a prior of group.signature_prior times the
     items per cell (smoothing_of), fitted by EM (best of several restarts by likelihood). A user
     of a few items shares few cells with the others of its group, which defeats k-means on the
     count vectors (docs/results/groups.md, "Session 11"); the mixture instead scores each item
     against each group's map.

A federation runs the same clustering as rounds of sums over clients: shared/method/signature_sums.py.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.canaries import is_canary
from shared.data.encode import encode_users, make_batches
from shared.method.mta import kmeans

log = logging.getLogger(__name__)


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


def centred_directions(x: torch.Tensor) -> np.ndarray:
    """Each row minus the rows' mean, scaled to unit length: what k-means quantises."""
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
    kinds = torch.as_tensor(best_kmeans(centred_directions(inp), codes, seed, restarts))
    outputs = [x.output for u in users for x in u.train]
    if labels:
        distinct = sorted(set(outputs))
        answer = torch.tensor([distinct.index(o) for o in outputs])
        n_answers = len(distinct)
    else:
        answer = torch.as_tensor(best_kmeans(centred_directions(ans), codes, seed + 1, restarts))
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
