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
     distribution of answers per kind of input, fitted by EM (best of several restarts by
     likelihood). A user of a few items shares few cells with the others of its group, which
     defeats k-means on the count vectors (ARI 0.23-0.52 against EM's 0.71-0.77 with the true
     themes, 60 users in 5 groups: docs/results/groups.md, "Session 11"); the mixture instead
     scores each item against each group's map.

It needs every user's items in one place: a run where one client holds all users (`proper local`).
A federation of small clients would need a server round of centroids over signatures (which tell
the server each user's answer histogram): not built; docs/decisions.md.
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

log = logging.getLogger(__name__)


def refuse_in_federation(cfg) -> None:
    """A federated client clusters only its own users and would number its groups its own way:
    group.assign_start=signature is for one process holding every user (`proper local`)."""
    if OmegaConf.select(cfg, "group.assign_start", default="random") == "signature":
        from shared.runtime.config import ConfigError
        raise ConfigError("group.assign_start=signature clusters the users held in one process (each federated "
                          "client would number its groups its own way): use `proper local`, or "
                          "group.assign_start=random (docs/decisions.md)")


def best_kmeans(x: np.ndarray, k: int, seed: int, restarts: int) -> np.ndarray:
    """k-means labels, the best of `restarts` k-means++ starts by inertia (deterministic per seed)."""
    best = None
    for r in range(restarts):
        labels, cent = kmeans(x, k, seed=seed * 1009 + r)
        inertia = float(((x - cent[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    return best[1]


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
    users = [replace(u, train=[x for x in u.train if not is_canary(x)]) for u in users]
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


def answer_maps(counts: torch.Tensor, k: int, seed: int, restarts: int = 20, iters: int = 100,
                smoothing: float = 0.1) -> torch.Tensor:
    """[U] each user's cluster under a mixture of k answer maps fitted to counts [U, kinds, answers]
    by EM: a map is p(answer | kind), smoothed by `smoothing` pseudo-counts per cell; a user's
    log-likelihood under a map sums its items' log p. Best of `restarts` random starts (seeded) by
    the data's log-likelihood."""
    if smoothing <= 0:
        raise ValueError("answer_maps needs smoothing > 0 (an unseen cell would have log 0)")
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
                     restarts: int = 20) -> torch.Tensor:
    """[U] each user's group (0..k-1) from its answer signature: the assignment's start. A group the
    mixture leaves empty is logged: under group.reassign=false its expert gets no user."""
    groups = answer_maps(answer_signatures(model, tokenizer, users, max_len, codes, seed, labels), k, seed, restarts)
    empty = [e for e in range(k) if not (groups == e).any()]
    if empty:
        log.warning("answer signatures: no user in group(s) %s of k=%d; their experts get no assigned user", empty, k)
    return groups
