"""A log line every minute on long loops, so a 10-minute stage is not silent."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("proper.progress")


class Progress:
    """A log line every `every` seconds on long loops, so a 10-minute stage is not silent."""

    def __init__(self, what: str, total_steps: int, every: float = 60.0):
        self.what, self.total, self.every = what, total_steps, every
        self.t0 = self.last = time.time()
        self.step = 0

    def tick(self, loss: float, tokens: int):
        self.step += 1
        now = time.time()
        if now - self.last >= self.every and self.step < self.total:
            self.last = now
            log.info("%s: step %d/%d, loss %.3f, %.0f tok/s", self.what, self.step, self.total, loss,
                     tokens / max(now - self.t0, 1e-9))
