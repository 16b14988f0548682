"""A server-coordinated stage (population, group): its shared part, the server state it keeps
(server/state.py: the parameters, the server optimizer's state), and one round of it.

A round: the stage's start (the seeded initial parameters where a server step needs them; the
group stage adds its own, group.py), the chained round through the stage's strategy
(server/strategies/chains.py; average and server step: server/strategies/), then the stage keeps
the result, its optimizer's state and, under privacy.dp, the release for the accountant.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy

from server.privacy import note_release
from server.state import PartState
from server.strategies import load_state, make_strategy, needs_start, state_tensors
from server.strategies.chains import chained_round, expected_clients, round_nodes
from server.strategies.privacy import PrivateAverage
from server.strategies.trained_replies import TrainedReplies
from shared.method.plan import Step
from shared.runtime import protocol as P

if TYPE_CHECKING:
    from server.federation import Federation

log = logging.getLogger("proper.server")


class TooFewReplies(RuntimeError):
    """A training step heard back from fewer valid clients than federation.min_replies."""


class SharedRound:
    """Subclasses name the stage and build its average (and may add to `start` and `keep`)."""
    name: str

    def __init__(self, fed: Federation, state: PartState):
        self.fed, self.cfg, self.state = fed, fed.cfg, state
        self.optimizer = None   # the stage's server optimizer, made at its first round and kept across them

    def make_average(self) -> Strategy:
        raise NotImplementedError

    def start(self, step: Step):
        """Before a round: the stage's initial parameters, where its server step needs them."""
        self.initial_parameters(step)

    def keep(self):
        """After a round that aggregated: what the stage keeps besides its parameters."""

    def init_query(self) -> RecordDict:
        """What query.init sends to ask for the stage's seeded initial parameters."""
        return RecordDict({P.CONFIG: ConfigRecord({"part": self.name})})

    def round(self, step: Step):
        """One round; the result replaces the stage's shared part."""
        fed = self.fed
        self.start(step)
        if self.optimizer is None:   # a resumed run takes the optimizer's state back from the checkpoint
            self.optimizer = make_strategy(self.cfg, self.name, self.make_average())
            load_state(self.optimizer, self.state.optimizer)
        start = self.state.parameters
        private = self.optimizer.average if isinstance(self.optimizer.average, PrivateAverage) else None
        if not round_nodes(fed, self.name, step.round):   # an empty Poisson sample: nothing sent, nothing kept
            log.warning("%s: no client sampled (federation.sampling=poisson); the %s parameters stay", step, self.name)
            if private is not None:   # accounted all the same: the accountant counts every round (server/privacy.py)
                note_release(fed, self.name, step.round, 0)
            return
        if private is not None and str(self.cfg.federation.sampling) == "poisson":
            # the fixed denominator of the sensitivity analysis: m = q N, not the realised count
            private.expected = expected_clients(self.cfg, len(fed.nodes()))
        arrays, metrics = chained_round(fed, step.name, self.name, step.round, TrainedReplies(self.optimizer),
                                        fed.arrays(self.name))
        valid, least = fed.progress.participation.get(step.name, {}).get("ok", 0), self.cfg.federation.min_replies
        if valid < least:   # the step is not saved: the checkpoint keeps the state after the last step done
            raise TooFewReplies(f"{step}: {valid} valid replies, fewer than federation.min_replies={least} "
                                "(failed, silent and dropped nodes are logged above); the run stops at its last "
                                "checkpoint")
        if arrays is None:
            log.warning("%s: no client succeeded; the %s parameters stay as they were", step, self.name)
            return
        dtypes = {k: v.dtype for k, v in (start or {}).items()}
        # a server optimizer computes in float64 (numpy); the part keeps the clients' dtype
        self.state.parameters = {k: v.to(dtypes.get(k, torch.float32))
                                 for k, v in arrays.to_torch_state_dict().items()}
        self.keep()
        self.state.optimizer = state_tensors(self.optimizer) or None
        if private is not None:   # privacy.dp: a noised release, for the accountant
            note_release(fed, self.name, step.round, private.updates)
        m = dict(metrics or {})
        fed.log_train(step, m)
        log.info("%s: loss %.4f over %d examples", step, m.get("train_loss", float("nan")), m.get(P.NUM_EXAMPLES, 0))

    def initial_parameters(self, step: Step):
        """Ask one client for the seeded starting point of the part (query.init): a server optimizer
        steps from the parameters a round started from, so it needs them before the first round."""
        fed = self.fed
        if self.state.parameters or not needs_start(self.cfg, self.name):
            return
        content = self.init_query()
        for node in fed.nodes():
            ok = fed.collect(f"{step}/init", [Message(content, dst_node_id=node, message_type=P.QUERY_INIT)])
            if ok:
                self.state.parameters = ok[0].content[P.ARRAYS].to_torch_state_dict()
                return
        raise RuntimeError(f"{step}: no client returned the initial {self.name} parameters")
