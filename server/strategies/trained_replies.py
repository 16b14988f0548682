"""The outermost wrapper of a stage's strategy: only the replies that trained on something count."""
from __future__ import annotations

from server.strategies.wrapper import Wrapper
from shared.runtime import protocol as P


class TrainedReplies(Wrapper):
    """A strategy that aggregates only the replies that trained on something. A client whose users
    all have no history replies with zero examples (client/trainer.py): it weighs nothing in the
    average anyway, and a round where only such clients answered keeps the parameters as they were,
    as a round where every client failed does, where Flower's average would divide by zero."""

    def aggregate_train(self, server_round: int, replies):
        trained = [r for r in replies if r.has_error() or float(r.content[P.METRICS].get(P.NUM_EXAMPLES, 1)) > 0]
        if not trained:
            return None, None
        return self.inner.aggregate_train(server_round, trained)
