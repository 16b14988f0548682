"""Fixtures shared by the test modules (plain helpers: tests/helpers.py, tests/lamp_files.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass

# as sim/cli.py does, before torch loads: idle OpenMP threads sleep (spinning ones slowed the suite
# several times over on a busy 2-core machine); no number changes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests.lamp_files import BAD_LAMP, write_bad_lamp


@pytest.fixture(params=sorted(BAD_LAMP))
def bad_lamp(request, tmp_path):
    """Each case of the malformed-LaMP corpus in turn: (its directory, what the error must say)."""
    return write_bad_lamp(request.param, tmp_path / "data"), BAD_LAMP[request.param]


@dataclass
class Outcome:
    code: int
    out: str
    err: list[str]  # the lines written to stderr


@pytest.fixture
def proper(capsys):
    """Run the `proper` command in this process: proper("local", "-c", "tiny", ...) -> Outcome."""
    from sim.cli import main

    def run(*argv: str) -> Outcome:
        capsys.readouterr()  # only what this command writes
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err.splitlines())
    return run


@pytest.fixture
def task_identity():
    """A Message outside a run needs these, which a ServerApp has."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
