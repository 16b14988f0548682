"""server/patient_grid.py: the ServerApp's reads survive a SuperLink that answers 500 for a while
(SQLite "database is locked" under 30 SuperNodes, docs/results/reliability.md); other errors and
pushes go through untouched."""
from __future__ import annotations

import httpx
import pytest

from server.patient_grid import PatientGrid


def error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
    return httpx.HTTPStatusError(f"Server error '{status}'", request=request, response=httpx.Response(status,
                                 request=request))


class FlakyGrid:
    def __init__(self, failures: list[Exception]):
        self.failures, self.calls, self.pushed = list(failures), 0, []

    def pull_messages(self, ids):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return iter([f"reply-to-{i}" for i in ids])

    def get_node_ids(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return iter([3, 1])

    def push_messages(self, msgs):
        self.calls += 1
        raise error(500)


def test_reads_are_retried_on_server_errors_and_dropped_connections():
    grid = FlakyGrid([error(500), httpx.ConnectError("refused")])
    assert PatientGrid(grid, wait_s=0).pull_messages(("a", "b")) == ["reply-to-a", "reply-to-b"]
    assert grid.calls == 3
    grid = FlakyGrid([error(503)])
    assert PatientGrid(grid, wait_s=0).get_node_ids() == [3, 1]


def test_other_errors_pushes_and_the_last_try_go_up():
    with pytest.raises(httpx.HTTPStatusError):       # a client error is not transient
        PatientGrid(FlakyGrid([error(403)]), wait_s=0).pull_messages(["a"])
    with pytest.raises(ValueError):
        PatientGrid(FlakyGrid([ValueError("bad")]), wait_s=0).get_node_ids()
    grid = FlakyGrid([error(500)] * 3)
    with pytest.raises(httpx.HTTPStatusError):
        PatientGrid(grid, tries=3, wait_s=0).pull_messages(["a"])
    assert grid.calls == 3
    grid = FlakyGrid([])
    with pytest.raises(httpx.HTTPStatusError):       # a push is never repeated
        PatientGrid(grid, wait_s=0).push_messages(["m"])
    assert grid.calls == 1
