"""The one runner: it takes a method's steps in order (shared/method/plan.py stage_plan) and hands
each to the stage of its kind, for a federated run (server/server_app.py: the ServerApp's stages,
a checkpoint after every step) and for `proper local` (sim/local.py: one ClientTrainer holding every
user). The two differ only in their backend: what a stage's step does, and what happens after it.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

from shared.method.plan import Step

log = logging.getLogger("proper.run")


class Backend(Protocol):
    def done(self, step: Step) -> bool: ...            # already done (a resumed run skips it)
    def population(self, step: Step) -> None: ...      # one population round
    def group(self, step: Step) -> None: ...           # one group round
    def user(self, step: Step) -> None: ...            # the user stage
    def evaluate(self, step: Step) -> None: ...        # step.arg: the stage evaluated
    def mta(self, step: Step) -> None: ...             # step.arg: "bank" | "user"
    def after(self, step: Step, seconds: float) -> None: ...   # e.g. the checkpoint
    def finish(self, seconds: float) -> None: ...      # the per-stage table


def run_step(backend: Backend, step: Step):
    """The one dispatcher: a step goes to its kind's stage."""
    stages = {"population": backend.population, "group": backend.group, "user": backend.user,
              "eval": backend.evaluate, "mta": backend.mta}
    stages[step.kind](step)


def run(plan: list[Step], backend: Backend):
    t0 = time.time()
    for i, step in enumerate(plan, 1):
        if backend.done(step):
            continue
        log.info("[%d/%d] %s", i, len(plan), step)
        ts = time.time()
        run_step(backend, step)
        backend.after(step, time.time() - ts)
    backend.finish(time.time() - t0)
