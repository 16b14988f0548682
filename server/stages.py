"""The server's side of PROPER's three stages: population and group rounds (a strategy and the
chained schedule), the group stage's first pool of mixtures and its signature start
(server/signatures.py), and the user stage (clients train privately and reply metrics only)."""
from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from server.federation import Federation
from server.mta import bank_record
from server.privacy import note_release
from server.signatures import signature_start
from server.strategies import load_state, make_strategy, needs_start, state_tensors
from server.strategies.chains import chained_round, sampled_nodes
from server.strategies.group import mixture_pool
from shared.method import plan
from shared.runtime import protocol as P

log = logging.getLogger("proper.server")


def strategy_of(fed: Federation, stage: str):
    """The stage's strategy, made once and kept across its rounds (with its optimizer state, which
    a resumed run takes back from the checkpoint)."""
    if stage not in fed.strategies:
        fed.strategies[stage] = make_strategy(fed.cfg, stage)
        load_state(fed.strategies[stage], fed.parts.get(f"opt.{stage}"))
    return fed.strategies[stage]


def initial_parameters(fed: Federation, step: str, part: str):
    """Ask one client for the seeded starting point of `part` (query.init): a server optimizer
    steps from the parameters a round started from, so it needs them before the first round."""
    if fed.parts[part] or not needs_start(fed.cfg, part):
        return
    content = RecordDict({P.CONFIG: ConfigRecord({"part": part})})
    if part == "group":
        content[P.POPULATION] = fed.arrays("population")
    for node in fed.nodes():
        ok = fed.collect(f"{step}/init", [Message(content, dst_node_id=node, message_type=P.QUERY_INIT)])
        if ok:
            fed.parts[part] = ok[0].content[P.ARRAYS].to_torch_state_dict()
            return
    raise RuntimeError(f"{step}: no client returned the initial {part} parameters")


def initial_pool(fed: Federation, step: str, rnd: int):
    """group.initial_pool: before the first group round, the round's clients send their users'
    mixtures under the group start (query.mixtures; shuffled, no ids, as every round's replies),
    so the constraint loss has other users to push from in round 1 too. It costs one forward pass
    over those clients' histories and one message each way."""
    if fed.parts["mixtures"] is not None or not plan.initial_pool(fed.cfg):
        return
    if fed.cfg.privacy.get("mixtures", "share") == "local":   # nothing would come back: no messages
        return
    content = RecordDict({P.POPULATION: fed.arrays("population"), P.ARRAYS: fed.arrays("group")})
    nodes = sampled_nodes(fed.nodes(), fed.cfg, "group", rnd)
    ok = fed.collect(f"{step}/pool", [Message(content, dst_node_id=n, message_type=P.QUERY_MIXTURES) for n in nodes])
    if ok:
        fed.parts["mixtures"] = mixture_pool([r.content[P.ROUTING].to_torch_state_dict()["mixtures"] for r in ok],
                                             seed=int(fed.cfg.seed) * 7919)


def train_round(fed: Federation, step: str, stage: str, rnd: int):
    """One population or group round; the result replaces the stage's shared part."""
    if stage == "group" and not fed.parts["population"]:
        raise RuntimeError("group stage without a population LoRA: every population round failed")
    if stage == "group":
        signature_start(fed, step)   # group.assign_start=signature: once, before the first group round
    initial_parameters(fed, step, stage)
    strategy = strategy_of(fed, stage)
    if stage == "group":
        initial_pool(fed, step, rnd)
        strategy.population, strategy.pool = fed.arrays("population"), fed.parts["mixtures"]
        strategy.seed = int(fed.cfg.seed)
    start = fed.parts[stage]
    arrays, metrics = chained_round(fed, step, stage, rnd, TrainedReplies(strategy), fed.arrays(stage))
    if arrays is None:
        log.warning("%s: no client succeeded; the %s parameters stay as they were", step, stage)
        return
    dtypes = {k: v.dtype for k, v in (start or {}).items()}
    # a server optimizer computes in float64 (numpy); the part keeps the clients' dtype
    fed.parts[stage] = {k: v.to(dtypes.get(k, torch.float32)) for k, v in arrays.to_torch_state_dict().items()}
    if stage == "group":
        fed.parts["mixtures"] = strategy.pool
    fed.parts[f"opt.{stage}"] = state_tensors(strategy) or None
    if getattr(strategy, "dp", None) is not None:   # privacy.dp: a noised release, for the accountant
        note_release(fed, stage, rnd, strategy.dp.num_sampled_clients)
    m = dict(metrics or {})
    fed.log_train(step, m)
    log.info("%s: loss %.4f over %d examples", step, m.get("train_loss", float("nan")), m.get(P.NUM_EXAMPLES, 0))


class TrainedReplies:
    """A stage's strategy that aggregates only the replies that trained on something. A client whose
    users all have no history replies with zero examples (client/trainer.py): it weighs nothing in
    the average anyway, and a round where only such clients answered keeps the parameters as they
    were, as a round where every client failed does, where Flower's average would divide by zero."""

    def __init__(self, strategy):
        self.strategy = strategy

    def configure_train(self, *args):
        return self.strategy.configure_train(*args)

    def aggregate_train(self, server_round: int, replies):
        trained = [r for r in replies if r.has_error() or float(r.content[P.METRICS].get(P.NUM_EXAMPLES, 1)) > 0]
        if not trained:
            return None, None
        return self.strategy.aggregate_train(server_round, trained)


def model_content(fed: Federation) -> RecordDict:
    if fed.method == "mta":  # the meta-LoRA bank (server/mta.py)
        return RecordDict({P.BANK: bank_record(fed)})
    return RecordDict({P.POPULATION: fed.arrays("population"), P.ARRAYS: fed.arrays("group")})


def user_stage(fed: Federation, step: str):
    content = model_content(fed)
    content[P.CONFIG] = ConfigRecord({"stage": "user"})
    ok = fed.send(step, P.TRAIN_USER, content)
    # a client whose users all have no history trains none of them and sends no loss
    losses = [float(r.content[P.METRICS]["train_loss"]) for r in ok if "train_loss" in r.content[P.METRICS]]
    fed.log_train(step, {"train_loss": float(np.mean(losses)) if losses else None})
