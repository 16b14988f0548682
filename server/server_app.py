"""Flower ServerApp: PROPER's stages in order, a checkpoint after every step.

  eval:base -> population:1..R -> eval:population -> group:1..R -> eval:group
  -> user (clients train locally, reply metrics only) -> eval:user -> the per-stage table

Which steps a method takes: shared/method/plan.py; the runner that takes them: shared/runtime/runner.py.
Each stage's server side: server/stages/ (population, group, user), server/mta.py, server/evaluation.py.
A step whose clients fail or time out goes on with the replies that came; every step records which
nodes answered, failed or stayed silent, and how many users the replies covered
(server/federation.py). `--resume` skips the steps the checkpoint lists as done.
"""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.evaluation import evaluate, finish
from server.federation import Federation
from server.mta import mta_step
from server.patient_grid import PatientGrid
from server.stages.group import GroupStage
from server.stages.population import PopulationStage
from server.stages.user import user_stage
from server.virtual_grid import virtual_grid
from shared.method.plan import Step, stage_plan
from shared.runtime.runconfig import run_config_from_context
from shared.runtime.runner import run

app = ServerApp()


class InjectedCrash(RuntimeError):
    """debug.crash_after: stop the server right after a step (to test --resume)."""


class FederatedRun:
    """The runner's backend for a federation: each kind of step goes to its stage's server side."""

    def __init__(self, fed: Federation):
        self.fed = fed
        self.population_stage = PopulationStage(fed, fed.parts.population)
        self.group_stage = GroupStage(fed, fed.parts.group)

    def done(self, step: Step) -> bool:
        return step.name in self.fed.progress.done

    def population(self, step: Step):
        self.population_stage.round(step)

    def group(self, step: Step):
        self.group_stage.round(step)

    def user(self, step: Step):
        user_stage(self.fed, step)

    def evaluate(self, step: Step):
        evaluate(self.fed, step, self.group_stage.mean_mixture)

    def mta(self, step: Step):
        mta_step(self.fed, step)

    def after(self, step: Step, seconds: float):
        self.fed.save(step.name, seconds)
        if self.fed.cfg.debug.crash_after == step.name:
            raise InjectedCrash(f"debug.crash_after={step}")

    def finish(self, seconds: float):
        finish(self.fed, seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = run_config_from_context(context)
    fed = Federation(virtual_grid(PatientGrid(grid), cfg), cfg, run_dir)
    fed.wait_for_nodes(int(cfg.federation.min_available_clients))
    run(stage_plan(cfg), FederatedRun(fed))
