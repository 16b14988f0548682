"""Leakage audits of a finished run's models (`proper audit`, sim/audit.py; docs/decisions.md "Privacy").

Canary exposure (Carlini et al., 2019, "The Secret Sharer"). A canary's secret s is one of a space
S of |S| = 10^digits candidates. Rank the candidates by the model's log-perplexity of the output
given the canary's input (lower = more likely); exposure = log2 |S| - log2 rank(s). A secret the
model ranks first has exposure log2 |S| (13.3 bits for 4 digits); a secret ranked where a random
candidate would be, about 1 bit. Where the audit scores only a sample of m candidates (drawn
uniformly from S without s), the rank is estimated as 1 + (|S| - 1) * (candidates below s) / m
(`rank_exposure`, resolution log2(m + 1) bits), and extrapolated as Carlini et al. do from a
distribution fitted to the sampled log-perplexities (they fit a skew-normal; here a normal):
exposure = -log2 P(X <= x_s) (`extrapolated_exposure`, which can pass log2(m + 1)).

Membership inference (loss threshold, Yeom et al., 2018): the AUC of telling a user's training
items from its held-out items by the model's loss on them, lower loss read as "member". 0.5 is
chance; 1.0 tells every training item from every held-out one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from shared.data.encode import encode_example, make_batches, placed
from shared.runtime.precision import autocast


def exposure(rank: float, space: int) -> float:
    """log2 |S| - log2 rank (rank 1 = the most likely candidate)."""
    if rank < 1 or rank > space:
        raise ValueError(f"rank {rank} outside [1, {space}]")
    return math.log2(space) - math.log2(rank)


def rank_of(true_score: float, candidate_scores) -> int:
    """1 + how many candidates the model finds strictly more likely (lower log-perplexity);
    ties are counted in the secret's favour."""
    return 1 + int(np.sum(np.asarray(candidate_scores, dtype=np.float64) < true_score))


def rank_exposure(true_score: float, candidate_scores, space: int) -> tuple[float, float]:
    """(estimated rank in S, exposure) from m candidates drawn from S without the secret; exact
    where they are all of S but the secret (m = |S| - 1)."""
    m = len(candidate_scores)
    below = rank_of(true_score, candidate_scores) - 1
    rank = 1 + below * (space - 1) / m if m else 1.0
    return rank, exposure(rank, space)


def extrapolated_exposure(true_score: float, candidate_scores) -> float:
    """-log2 P(X <= x_secret), X normal with the candidates' mean and standard deviation."""
    x = np.asarray(candidate_scores, dtype=np.float64)
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    if sd <= 0:
        return 0.0 if true_score >= float(x.mean()) else math.inf
    z = (true_score - float(x.mean())) / sd
    # log of the normal CDF, stable in the far tail: log(0.5 * erfc(-z / sqrt 2))
    p = 0.5 * math.erfc(-z / math.sqrt(2))
    if p > 0:
        return max(0.0, -math.log2(p))
    # Mills ratio asymptote for z << 0: log P ~ -z^2/2 - log(-z sqrt(2 pi))
    return (z * z / 2 + math.log(-z * math.sqrt(2 * math.pi))) / math.log(2)


def membership_auc(member_losses, nonmember_losses) -> float:
    """P(loss of a member < loss of a non-member) + half the ties: the AUC of the loss threshold
    attack (Mann-Whitney U / (n m)). NaN where either side is empty."""
    a = np.asarray(member_losses, dtype=np.float64)
    b = np.asarray(nonmember_losses, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    less = (a[:, None] < b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((less + 0.5 * ties) / (len(a) * len(b)))


def example_losses(model, tokenizer, examples, cfg, user_emb: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (summed NLL of its output tokens in nats = log-perplexity x tokens, mean NLL per
    output token), under the model's current stage. user_emb [N, d] routes row i of the group and
    user stages; rows [N] picks each example's user part (stage 3 with ProperModel.user_parts)."""
    items = [encode_example(tokenizer, ex, i, cfg.train.max_len) for i, ex in enumerate(examples)]
    total = np.zeros(len(items))
    mean = np.zeros(len(items))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dev = model.device
        for batch in make_batches(items, batch_size, tokenizer.pad_token_id, None):
            idx = batch[3]   # on the CPU: it indexes the numpy results
            ids, mask, labels, at = placed(batch, dev)
            emb = None if user_emb is None else user_emb.to(dev)[at]
            r = None if rows is None else rows.to(dev)[at]
            with autocast(cfg.train, dev.type), model.users(emb, rows=r):
                logits = model.lm(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = labels[:, 1:]
            keep = target != -100
            nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            s = nll.sum(1)
            n = keep.sum(1).clamp(min=1)
            total[idx.numpy()] = s.cpu().numpy()
            mean[idx.numpy()] = (s / n).cpu().numpy()
    model.train(was_training)
    return total, mean
