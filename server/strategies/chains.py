"""The chained schedule (federation.chains = C): how a round's clients are visited.

A round samples its clients (federation.sampling: shuffle, the default, takes exactly
clients_per_round or fraction_train of them, seeded by the run's seed, the stage and the round;
poisson lets each join alone with probability q, see round_nodes), visits them in a seeded order
and splits them into C chains.
Chains run in parallel; inside a chain each client trains what the one before it returned. The C
chain results then go through the stage's strategy (average + server optimizer) as if each were
one client's reply, weighted by the examples the whole chain trained on (and, in the group stage,
by the routing mass of the whole chain).

  C = number of sampled clients (the default, chains: null): every chain is one client, and this is
      FedAvg's parallel round, message for message;
  C = 1: one chain through every sampled client: the sequential (cyclic) schedule;
  between: a round's wall time is about (clients / C) client-times in a deployment, against one
      client-time for FedAvg, while each chain makes (clients / C) sequential moves.
A client that fails or stays silent is passed over: its chain goes on from what it had.
"""
from __future__ import annotations

import logging
import math
import random
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.federation import content_order
from server.strategies.metrics import mean_scalar_metrics
from shared.runtime import protocol as P

log = logging.getLogger("proper.server")


class NodesView:
    """A grid that shows only some nodes: a strategy's configure_train samples all of them."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def expected_clients(cfg, population: int) -> int:
    """m, the clients a round takes: exactly (shuffle) or on average (poisson, q = m / population)."""
    fed = cfg.federation
    n = fed.clients_per_round or math.ceil(float(fed.fraction_train) * population)
    return max(1, min(int(n), population)) if population else 0


def sampled_nodes(nodes, cfg, stage: str, server_round: int, draw: random.Random | None = None) -> list[int]:
    """The round's clients in the order the chains visit them: a seeded shuffle, new every round
    (as a centralized epoch reshuffles its batches), cut to expected_clients (shuffle) or each kept
    with probability q = expected_clients / nodes by `draw` (poisson; draw: poisson_draw). `nodes`
    come in a stable order (Federation.nodes: by id, or by partition on the Ray engine, whose ids are
    random each run); the shuffle starts from it."""
    order = list(nodes)
    random.Random(f"{int(cfg.seed)}:{stage}:{server_round}").shuffle(order)
    m = expected_clients(cfg, len(order))
    if str(cfg.federation.sampling) != "poisson":
        return order[:m]
    draw = draw or poisson_draw(cfg, stage, server_round)
    q = m / len(order) if order else 0.0
    return [n for n in order if draw.random() < q]


def poisson_draw(cfg, stage: str, server_round: int) -> random.Random:
    """The generator of a round's Poisson draws. Amplification by sampling holds only if whoever
    sees the released parameters cannot tell who was sampled (docs/decisions.md "Privacy"): under
    privacy.dp the draws come from the operating system's entropy (random.SystemRandom), kept by no
    one; the run records only how many clients each round asked. privacy.dp.seed (a study's
    reproducible noise, already called nominal in the table) seeds them too; without DP the run's
    seed does (reproducible, nothing claimed)."""
    dp = cfg.privacy.dp
    if dp.noise_multiplier is not None and dp.seed is None:
        return random.SystemRandom()
    seed = dp.seed if dp.noise_multiplier is not None else cfg.seed
    return random.Random(f"{int(seed)}:{stage}:{server_round}:poisson")


def round_nodes(fed, stage: str, server_round: int) -> list[int]:
    """sampled_nodes of a round, drawn once per server process: the first-pool query, the round
    and the accountant's record see the same clients (a resumed run draws a redone round anew)."""
    key = (stage, int(server_round))
    if key not in fed.round_samples:
        fed.round_samples[key] = sampled_nodes(fed.nodes(), fed.cfg, stage, server_round)
    return fed.round_samples[key]


def split_chains(nodes: list[int], chains: int | None) -> list[list[int]]:
    """Contiguous chains whose lengths differ by at most one; None: one chain per node."""
    c = len(nodes) if not chains else max(1, min(int(chains), len(nodes)))
    size, extra = divmod(len(nodes), c)
    out, i = [], 0
    for j in range(c):
        n = size + (j < extra)
        out.append(nodes[i:i + n])
        i += n
    return out


def _next_message(template: Message, arrays: ArrayRecord, node: int) -> Message:
    content = RecordDict(dict(template.content.items()))
    content[P.ARRAYS] = arrays
    return Message(content, dst_node_id=node, message_type=template.metadata.message_type)


def _chain_result(replies: list[Message]) -> Message:
    """A chain's replies as one: its last parameters, weighted by everything the chain trained on."""
    last = replies[-1]
    if len(replies) == 1:
        return last
    contents = [r.content for r in replies]
    last.content[P.METRICS] = MetricRecord({**mean_scalar_metrics(contents, P.NUM_EXAMPLES),
                                            P.NUM_USERS: sum(int(c[P.METRICS].get(P.NUM_USERS, 0)) for c in contents)})
    if P.ROUTING in last.content.array_records:
        routing = [c[P.ROUTING].to_torch_state_dict() for c in contents]
        last.content[P.ROUTING] = ArrayRecord({
            "routing_mass": torch.stack([r["routing_mass"] for r in routing]).sum(0),
            "mixtures": torch.cat([r["mixtures"] for r in routing])})
    return last


def chained_round(fed, step: str, stage: str, server_round: int, strategy, start: ArrayRecord):
    """One round of `stage`: (arrays, metrics) from the strategy's aggregation, (None, None) when no
    client succeeded."""
    nodes = round_nodes(fed, stage, server_round)
    if not nodes:   # a Poisson sample can be empty: no message, the stage's parameters stay
        log.warning("%s: the round's Poisson sample is empty", step)
        return None, None
    chains = split_chains(nodes, fed.cfg.federation.chains)
    config = ConfigRecord({P.SERVER_ROUND: server_round})
    first = {m.metadata.dst_node_id: m for m in
             strategy.configure_train(server_round, start, config, NodesView(c[0] for c in chains))}
    pending = {i: first[c[0]] for i, c in enumerate(chains)}
    results: list[list[Message]] = [[] for _ in chains]
    fed.progress.participation.pop(step, None)
    depth_total, t0 = max(len(c) for c in chains), time.time()
    for depth in range(depth_total):
        if depth_total > 1:
            log.info("%s: chain step %d/%d, %d chains (%.0f s)", step, depth + 1, depth_total, len(pending),
                     time.time() - t0)
        replies = {r.metadata.src_node_id: r for r in fed.collect(step, list(pending.values()), accumulate=True)}
        sent, pending = pending, {}
        for i, chain in enumerate(chains):
            if i in sent and chain[depth] in replies:
                results[i].append(replies[chain[depth]])
            if depth + 1 < len(chain):
                arrays = results[i][-1].content[P.ARRAYS] if results[i] else sent[i].content[P.ARRAYS]
                pending[i] = _next_message(sent[i], arrays, chain[depth + 1])
    # in an order fixed by content, as Federation.collect orders a parallel round's replies
    combined = sorted((_chain_result(rs) for rs in results if rs), key=content_order)
    if not combined:
        return None, None
    return strategy.aggregate_train(server_round, combined)
