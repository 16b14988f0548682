"""What PROPER's stages minimise: the answer loss, and the group stage's constraint loss on the users'
expert mixtures (with its two experimental forms, group.constraint_form=balance and assign).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def answer_loss(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lm_loss, computing the vocabulary projection only where there is a label.

    Only the few answer tokens of each example are learned, yet a full forward projects every
    position onto the vocabulary (49k x 576 for SmolLM2: ~40 % of the FLOPs and a [B, T, V]
    tensor); projecting the answer positions alone gives the same loss for a fraction of the cost.
    """
    logits, target, _ = answer_logits(lm, ids, mask, labels)
    return F.cross_entropy(logits.float(), target)


def answer_logits(lm, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """(logits [N, V] at the N answer positions, their targets [N], which row each came from [N])."""
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    return lm.get_output_embeddings()(hidden[:, :-1][keep]), target[keep], keep.nonzero()[:, 0]


# ---------------------------------------------------------------- the constraint loss
def user_mixtures(betas: list[torch.Tensor], mask: torch.Tensor, users: torch.Tensor):
    """Per-user mean routing weights p_u: ([U, L, k], the users' indices, tokens per user).

    betas: one [B, T, k] tensor per layer; mask: [B, T] real tokens.
    """
    m = mask.to(betas[0].dtype).unsqueeze(-1)                      # [B, T, 1]
    sums = torch.stack([(b * m).sum(1) for b in betas], dim=1)    # [B, L, k] token sums per row
    uniq, inv = torch.unique(users, return_inverse=True)
    per_user = torch.zeros(len(uniq), *sums.shape[1:], dtype=sums.dtype, device=sums.device).index_add(0, inv, sums)
    tokens = torch.zeros(len(uniq), dtype=sums.dtype, device=sums.device).index_add(0, inv, mask.sum(1).to(sums.dtype))
    return per_user / tokens.view(-1, 1, 1), uniq, tokens


def constraint_loss(p: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over pairs of different users' mixtures (flattened over layers).

    p: [U, L, k] mixtures of the users in this batch (with gradients);
    others: [V, L, k] mixtures of other users from the previous round (constants), or None.
    Minimising it pushes users' mixtures apart, which keeps the experts from collapsing.
    """
    a = F.normalize(p.flatten(1), dim=-1)
    sims = []
    if len(a) > 1:
        s = a @ a.T
        off = ~torch.eye(len(a), dtype=torch.bool)
        sims.append(s[off])
    if others is not None and len(others):
        b = F.normalize(others.flatten(1).to(a.dtype), dim=-1)
        sims.append((a @ b.T).flatten())
    if not sims:
        return p.sum() * 0.0
    return torch.cat(sims).mean()


def balance_loss(p: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """The constraint on groups rather than on pairs (group.constraint_form=balance), per layer and
    averaged over layers, in units of log k:
        mean_u H(p_u) - H(mean_u p_u)
    the negative mutual information between user and expert: low when each user routes to few
    experts and the experts are evenly used. Unlike the pairwise cosine it does not push two users
    of one group apart: they may share experts as long as the users as a whole spread over them.

    p: [U, L, k] this batch's users' mixtures (with gradients); others: [V, L, k] other users'
    mixtures (constants) that join the marginal, so a one-user client still sees how the experts
    are used by everyone else."""
    k = p.shape[-1]
    q = p.float()
    marginal = q if others is None or not len(others) else torch.cat([q, others.to(q)])
    own = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()                       # mean over users, layers
    mean = marginal.mean(0)                                                     # [L, k]
    spread = -(mean * mean.clamp_min(1e-12).log()).sum(-1).mean()              # mean over layers
    return (own - spread) / math.log(k)


def assignment_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """group.constraint_form=assign: the cross-entropy from each user's mixture, in every layer, to
    its assigned expert (target [U], from assign_experts): mean over users and layers of
    -log p_u[l, target_u]."""
    picked = p.float().gather(-1, target.view(-1, 1, 1).expand(-1, p.shape[1], 1))
    return -picked.clamp_min(1e-12).log().mean()
