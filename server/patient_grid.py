"""The ServerApp's grid, patient with a SuperLink that answers a read with a server error.

With 30 SuperNodes on 2 busy cores the SuperLink's SQLite database answered requests with
`database is locked`, which reaches the ServerApp as HTTP 500 on pull-messages; Flower 1.41 retries
only some status codes, so one such answer ended the whole run (docs/results/reliability.md, "Load
test"). The reads the server repeats anyway (the connected nodes, the replies that came) are tried
again here; pushing messages is not (a retried push could send a round twice).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("proper.server")

TRIES = 8        # attempts of one read before its error goes up
WAIT_S = 1.0     # the first wait between attempts; doubled each time, at most 15 s


def transient(exc: Exception) -> bool:
    """A server-side error (5xx) or a dropped connection: worth asking again."""
    import httpx
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


class PatientGrid:
    """Wraps a Flower Grid: get_node_ids and pull_messages are retried on transient errors;
    everything else goes to the grid as it is."""

    def __init__(self, grid, tries: int = TRIES, wait_s: float = WAIT_S):
        self._grid, self._tries, self._wait_s = grid, tries, wait_s

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _again(self, what: str, call):
        wait = self._wait_s
        for attempt in range(1, self._tries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only transient ones are retried, below
                if attempt == self._tries or not transient(exc):
                    raise
                log.warning("%s: the SuperLink answered %s; trying again in %.0f s (%d/%d)",
                            what, str(exc).splitlines()[0][:160], wait, attempt, self._tries)
                time.sleep(wait)
                wait = min(2 * wait, 15.0)

    def get_node_ids(self):
        return self._again("get_node_ids", lambda: list(self._grid.get_node_ids()))

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        return self._again("pull_messages", lambda: list(self._grid.pull_messages(ids)))
