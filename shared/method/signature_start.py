"""The signature start: an optional hook of the group stage (group.assign_start=signature).

The group stage's assignment by loss (constraint_form=assign, IFCA-style) starts from a random
draw while its experts are still identical, and a random start meets the clustering's local
optima. The signature start replaces that draw by a clustering of the users' answer signatures:
what each user answers to what kind of input. A group is a way of answering (docs/results/groups.md).

This module is the hook's one place: whether a run uses it, and its knobs. The clustering itself:
  shared/method/answer_signatures.py   one process holding every user (`proper local`)
  shared/method/signature_sums.py      the same clustering as sums over clients (a federation)
  server/signature_rounds.py           the server's rounds, once before the first group round
  client/signature_replies.py          a client's replies; it decides and keeps its users' groups
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from shared.method.plan import uses_assignment


@dataclass(frozen=True)
class SignatureStart:
    """The signature start's knobs, read from the config here and nowhere else."""
    k: int            # groups: one per expert (adapters.k)
    codes: int        # kinds of input the items are quantised into (group.signature_codes)
    prior: float      # the answer maps' prior, a fraction of the items per cell (group.signature_prior)
    seed: int         # the run's seed: every start and restart is drawn from it
    max_len: int      # tokens per item read (the group stage's max_len)


def signature_start_of(cfg) -> SignatureStart | None:
    """The run's signature start, or None where its group stage starts the assignment at random
    (group.assign_start=random) or has no assignment to start (uses_assignment)."""
    if not uses_signature_start(cfg):
        return None
    from shared.runtime.config import stage_cfg
    return SignatureStart(k=int(cfg.adapters.k), codes=int(cfg.group.signature_codes),
                          prior=float(cfg.group.signature_prior), seed=int(cfg.seed),
                          max_len=int(stage_cfg(cfg, "group").max_len))


def uses_signature_start(cfg) -> bool:
    """Whether a run's group stage starts its assignment from the signatures: only where there is an
    assignment to start (group.constraint_form=assign with the user-aware router)."""
    return cfg.group.assign_start == "signature" and uses_assignment(cfg)


def refuse_in_federation(cfg, spec=None) -> None:
    """A federation clusters label answers only: free-text answers (generation tasks) are quantised
    by a k-means over every user's answers, which the federated rounds do not do."""
    if OmegaConf.select(cfg, "group.assign_start") == "signature" and spec is not None and spec.kind == "generation":
        from shared.runtime.config import ConfigError
        raise ConfigError(f"group.assign_start=signature in a federation needs a task with a closed answer set; "
                          f"{spec.name} answers in free text (its answers are clustered in one process only): "
                          "use `proper local`, or group.assign_start=random (docs/decisions.md)")
