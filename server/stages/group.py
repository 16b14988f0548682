"""Stage 2 on the server: the group part (experts and the user-aware router), and what only this
stage has: the pool of users' mixtures (shuffled, no ids) the constraint loss pushes from, its first
pool (group.initial_pool), the population LoRA sent along, the average by routing mass
(server/strategies/group.py), the signature start as an optional hook, and the mean mixture that
serves users with no history in the group and user evaluations.

privacy.mixtures is read here, once: share (the pool as sent), local (no pool: nothing is asked,
and users with no history get every expert alike), noise (the clients noise what they send; the mean
is cut to a distribution again).
"""
from __future__ import annotations

import logging

import torch
from flwr.app import Message, RecordDict

from server.signature_rounds import signature_start
from server.stages.round import SharedRound
from server.strategies import average_settings, dp_settings
from server.strategies.chains import round_nodes
from server.strategies.group import mixture_pool
from server.strategies.robust import group_average
from shared.method import plan
from shared.method.plan import Step
from shared.runtime import protocol as P

log = logging.getLogger("proper.server")


class GroupStage(SharedRound):
    name = "group"

    def __init__(self, fed, state):
        super().__init__(fed, state)
        self.mixtures = str(self.cfg.privacy.mixtures)   # share | noise | local
        self.average = None

    def start(self, step: Step):
        if not self.fed.parts.population.parameters:
            raise RuntimeError("group stage without a population LoRA: every population round failed")
        if self.state.signature is None:   # group.assign_start=signature: once, before the first group round
            self.state.signature = signature_start(self.fed, step.name)
        super().start(step)
        self.initial_pool(step)

    def init_query(self) -> RecordDict:
        content = super().init_query()
        content[P.POPULATION] = self.fed.arrays("population")   # the group part is made on the population LoRA
        return content

    def make_average(self):
        self.average = group_average(self.cfg.federation, self.fed.parts.population.parameters, self.state.mixtures,
                                     int(self.cfg.seed), uniform_weights=dp_settings(self.cfg) is not None,
                                     **average_settings(self.cfg))
        return self.average

    def keep(self):
        self.state.mixtures = self.average.pool

    def initial_pool(self, step: Step):
        """group.initial_pool: before the first group round, the round's clients send their users'
        mixtures under the group start (query.mixtures; shuffled, no ids, as every round's replies),
        so the constraint loss has other users to push from in round 1 too. It costs one forward pass
        over those clients' histories and one message each way."""
        fed = self.fed
        if self.state.mixtures is not None or not plan.initial_pool(self.cfg):
            return
        if self.mixtures == "local":   # nothing would come back: no messages
            return
        content = RecordDict({P.POPULATION: fed.arrays("population"), P.ARRAYS: fed.arrays("group")})
        nodes = round_nodes(fed, "group", step.round)
        ok = fed.collect(f"{step}/pool", [Message(content, dst_node_id=n, message_type=P.QUERY_MIXTURES)
                                          for n in nodes])
        if ok:
            self.state.mixtures = mixture_pool([r.content[P.ROUTING].to_torch_state_dict()["mixtures"] for r in ok],
                                               seed=int(self.cfg.seed) * 7919)

    def mean_mixture(self):
        """[L, k], how users with no history are routed in the group and user evaluations, or None."""
        return mean_mixture(self.mixtures, self.state.mixtures, self.state.parameters, self.fed.method)


def mean_mixture(how: str, pool: torch.Tensor | None, group: dict | None, method: str):
    """The mean of the trained users' mixtures: the mean of the pool every group round's clients
    already receive, so nothing new leaves the server. privacy.mixtures=noise: that mean with its
    negative weights cut and its rows summed to 1 again (post-processing of what was released).
    privacy.mixtures=local: no pool exists; every expert weighs the same. None: no group part."""
    if pool is not None and len(pool):
        mean = pool.float().mean(0)
        if how == "noise":
            mean = mean.clamp_min(0)
            mean = mean / mean.sum(-1, keepdim=True).clamp_min(1e-12)
        return mean
    if how != "local" or method != "proper" or not group:
        return None
    routers = [v for key, v in group.items() if key.endswith(".router_h")]
    return torch.full((len(routers), int(routers[0].shape[0])), 1.0 / int(routers[0].shape[0]))
