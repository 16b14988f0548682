"""The server's state, typed: what a run has done (Progress) and the shared parts its stages keep
(PartState for a server-coordinated stage, GroupState for the group stage's extra), all of it
checkpointed after every step (server/checkpoint.py) in the format it always had:

  progress.json   {"done": [step names], "evals", "participation", "seconds", "privacy",
                   "no_history", "task"}
  tensors         "<stage>/<key>" the stage's parameters, "opt.<stage>/<key>" its server optimizer's
                  state, "mixtures" the group stage's pool, "signature/<key>" its signature start
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.method.plan import Step

Tensors = dict[str, torch.Tensor]


@dataclass
class Progress:
    """What the run has done; step names are Step.name ("population:2", "group:1/pool" for a query)."""
    done: list[str] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)           # stage -> split -> statistics
    participation: dict[str, dict[str, int]] = field(default_factory=dict)   # step -> sent/ok/failed/silent/users
    seconds: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, list[dict]] = field(default_factory=dict)   # stage -> its noised releases (server/privacy.py)
    no_history: int = 0
    task: str | None = None

    KEYS = ("done", "evals", "participation", "seconds", "privacy", "no_history", "task")

    def to_json(self) -> dict:
        """As progress.json always had it: "privacy" and "task" only once there is one."""
        return {key: getattr(self, key) for key in self.KEYS if key not in ("privacy", "task") or getattr(self, key)}

    @classmethod
    def from_json(cls, saved: dict) -> Progress:
        if "done" not in saved:
            raise ValueError("checkpoint/progress.json lists no steps done: not a checkpoint of a proper-fl run")
        return cls(**{key: saved[key] for key in cls.KEYS if key in saved})

    def trained_steps(self):
        """(stage, participation) of every training step, queries ("group:1/pool": not the step's own
        name) left out."""
        for name, p in self.participation.items():
            step = Step.parse(name)
            if step.trains and step.name == name:
                yield step.kind, p

    def evaluations(self) -> list[dict[str, int]]:
        return [p for name, p in self.participation.items() if Step.parse(name).kind == "eval"]

    def users_evaluated(self) -> int:
        return max((p["users"] for p in self.evaluations()), default=0)


@dataclass
class PartState:
    """A server-coordinated stage's shared part: its parameters and its server optimizer's state."""
    name: str
    parameters: Tensors | None = None
    optimizer: Tensors | None = None

    def checkpoint(self) -> dict:
        return {self.name: self.parameters, f"opt.{self.name}": self.optimizer}

    def restore(self, parts: dict):
        self.parameters, self.optimizer = parts.get(self.name), parts.get(f"opt.{self.name}")


@dataclass
class GroupState(PartState):
    """The group part, plus the pool of users' mixtures (shuffled, no ids) the constraint loss
    pushes from, and the signature start's result (group.assign_start=signature)."""
    mixtures: torch.Tensor | None = None
    signature: Tensors | None = None

    def checkpoint(self) -> dict:
        return {**super().checkpoint(), "mixtures": self.mixtures, "signature": self.signature}

    def restore(self, parts: dict):
        super().restore(parts)
        self.mixtures, self.signature = parts.get("mixtures"), parts.get("signature")


@dataclass
class SharedParts:
    """Everything a later step needs from an earlier one. The MTA bank is checkpointed as its own file
    (server/mta.py), not with the rest."""
    population: PartState = field(default_factory=lambda: PartState("population"))
    group: GroupState = field(default_factory=lambda: GroupState("group"))
    bank: object | None = None   # shared.method.mta.Bank

    def checkpoint(self) -> dict:
        return {**self.population.checkpoint(), **self.group.checkpoint()}

    def restore(self, parts: dict):
        self.population.restore(parts)
        self.group.restore(parts)
