"""Flower ServerApp: PROPER's stages in order, a checkpoint after every step.

  eval:base -> population:1..R -> eval:population -> group:1..R -> eval:group
  -> user (clients train locally, reply metrics only) -> eval:user -> the per-stage table

Which steps a method takes: shared/method/plan.py. A round's clients, their chains and the server
optimizer: server/strategies/. A step whose clients fail or time out goes on with the replies that
came; every step records which nodes answered, failed or stayed silent, and how many users the
replies covered (server/federation.py). `--resume` skips the steps the checkpoint lists as done.
"""
from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.evaluation import evaluate, finish
from server.federation import Federation
from server.mta import mta_step
from server.stages import train_round, user_stage
from server.virtual_grid import virtual_grid
from shared.method.plan import stage_plan
from shared.runtime.runconfig import run_config_from_context

log = logging.getLogger("proper.server")
app = ServerApp()


class InjectedCrash(RuntimeError):
    """debug.crash_after: stop the server right after a step (to test --resume)."""


def run_step(fed: Federation, step: str):
    kind, _, arg = step.partition(":")
    if kind in ("population", "group"):
        train_round(fed, step, kind, int(arg))
    elif kind == "user":
        user_stage(fed, step)
    elif kind == "eval":
        evaluate(fed, step, arg)
    elif kind == "mta":
        mta_step(fed, step, arg)
    else:
        raise ValueError(f"unknown step {step!r}")


def run(fed: Federation):
    t0 = time.time()
    plan = [step.name for step in stage_plan(fed.cfg)]
    fed.wait_for_nodes(int(fed.cfg.federation.min_available_clients))
    for i, step in enumerate(plan, 1):
        if step in fed.progress["done"]:
            continue
        log.info("[%d/%d] %s", i, len(plan), step)
        ts = time.time()
        run_step(fed, step)
        fed.progress.setdefault("seconds", {})[step] = time.time() - ts
        fed.save(step)
        if str(fed.cfg.debug.crash_after or "") == step:
            raise InjectedCrash(f"debug.crash_after={step}")
    finish(fed, time.time() - t0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = run_config_from_context(context)
    run(Federation(virtual_grid(grid, cfg), cfg, run_dir))
