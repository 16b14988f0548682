"""Flower ClientApp: one handler per PROPER stage (Message API, flwr 1.41; shared/runtime/protocol.py
lists what each message carries).

  train.population  stage 1: population LoRA in -> population LoRA, num-examples, metrics out
  train.group       stage 2: experts + routers in (+ others' mixtures) -> experts + routers,
                    routing mass, this client's users' mixtures (shuffled, no ids), metrics out
  train.user        stage 3: the final group model in -> metrics only out
  query.init        the seeded starting point of a shared part (for a server optimizer)
  query.mixtures    the users' mixtures under the group start (the constraint loss's first pool)
  query.signature   group.assign_start=signature: sums of this client's users' answer signatures
                    (client/signature_replies.py); their groups are decided and kept here
  query.partition   Ray simulation only: this node's partition-id, the stable name the server orders
                    its nodes by (Flower's engine gives random node ids each run)
  evaluate          any stage: its parameters in -> sufficient statistics + per-user scores out
  MTA's handlers:   client/mta.py
"""
from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import mta
from client.hostile import hostile_mod
from client.privacy import dp_clip_mod
from client.runtime import arrays_in, arrays_to_evaluate, config_of, reply, server_round, trainer_for
from client.virtual import virtual_clients_mod
from shared.runtime import protocol as P
from shared.runtime.runconfig import run_config_from_context


def reply_audit_mod(msg: Message, context: Context, call_next) -> Message:
    """With federation.audit_replies, write what each reply carries to <run dir>/wire/: record
    names, keys, shapes and bytes (never values), so anyone can see what crosses the wire."""
    out = call_next(msg, context)
    cfg, run_dir = run_config_from_context(context)
    if cfg.federation.audit_replies:
        from client.audit import record_reply
        record_reply(Path(run_dir) / "wire", msg, out, context)
    return out


# the audit records the reply as it leaves, after privacy.dp's client-side clipping; a SuperNode
# serving virtual clients runs both once per virtual client, inside its mod (client/virtual.py)
app = ClientApp(mods=[virtual_clients_mod, reply_audit_mod, hostile_mod, dp_clip_mod])
mta.register(app)


def _counts(t, num_examples: int) -> dict:
    """A training reply covers the users with a history: the others are skipped in training."""
    return {P.NUM_EXAMPLES: num_examples, P.NUM_USERS: len(t.trained)}


@app.train("population")
def population(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "population")
    r = t.population(arrays_in(msg, P.ARRAYS), server_round(msg))
    return reply(msg, {**_counts(t, r.num_examples), **r.metrics}, {P.ARRAYS: ArrayRecord(r.shared)})


@app.train("group")
def group(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "group")
    others = arrays_in(msg, P.OTHERS)
    r = t.group(arrays_in(msg, P.POPULATION), arrays_in(msg, P.ARRAYS),
                None if others is None else others["mixtures"], server_round(msg))
    routing = ArrayRecord({"routing_mass": r.routing_mass, "mixtures": r.mixtures})
    return reply(msg, {**_counts(t, r.num_examples), **r.metrics},
                 {P.ARRAYS: ArrayRecord(r.shared), P.ROUTING: routing})


@app.train("user")
def user(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "user")
    m = t.user(arrays_in(msg, P.POPULATION), arrays_in(msg, P.ARRAYS))
    return reply(msg, {**_counts(t, sum(len(u.train) for u in t.trained)), **m})


@app.query("init")
def initial_parameters(msg: Message, context: Context) -> Message:
    """The seeded starting point of the population LoRA or of the group part, which a server
    optimizer needs before a stage's first round (no user data used)."""
    t = trainer_for(context, "init")
    part = str(config_of(msg).get("part", "population"))
    arrays = t.initial(part, arrays_in(msg, P.POPULATION))
    return reply(msg, {P.NUM_USERS: len(t.users)}, {P.ARRAYS: ArrayRecord(arrays)})


@app.query("mixtures")
def initial_mixtures(msg: Message, context: Context) -> Message:
    """The users' mixtures under the group part the first round starts from (shuffled, no ids):
    the pool that round's constraint loss pushes from (group.initial_pool)."""
    t = trainer_for(context, "group")
    mixtures = t.initial_mixtures(arrays_in(msg, P.POPULATION), arrays_in(msg, P.ARRAYS))
    return reply(msg, {P.NUM_USERS: len(t.users)}, {P.ROUTING: ArrayRecord({"mixtures": mixtures})})


@app.query("signature")
def signature(msg: Message, context: Context) -> Message:
    """One round of the federated signature start (client/signature_replies.py): sums over this client's
    users only; in the last round each user's group is decided and kept on this client."""
    from client.signature_replies import answer
    t = trainer_for(context, "signature")
    sums = answer(t, config_of(msg), arrays_in(msg, P.POPULATION), arrays_in(msg, P.ARRAYS))
    return reply(msg, {P.NUM_USERS: len(t.trained)}, {P.SIGNATURE: ArrayRecord(sums)} if sums else None)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """This SuperNode's partition-id (no data, no model): server/federation.py orders nodes by it, so a
    run on Flower's Ray engine, whose node ids are new each run, samples and chains the same clients
    every time (and the same as the in-process engine)."""
    return reply(msg, {P.PARTITION_ID: int(context.node_config.get("partition-id", -1))})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = config_of(msg)
    t = trainer_for(context, "eval")
    stage = str(cfg.get("stage", "base"))
    mean = arrays_to_evaluate(msg, P.MEAN_MIXTURE)  # the server's mean mixture, for users with no history
    metrics, examples = {}, 0
    for split in str(cfg.get("splits", "test")).split(","):
        r = mta.evaluate_message(t, stage, msg, split) if stage.startswith("mta") else \
            t.evaluate(stage, arrays_to_evaluate(msg, P.POPULATION), arrays_to_evaluate(msg, P.ARRAYS), split=split,
                       mean_mixture=None if mean is None else mean["mixture"])
        scores = list(r.user_scores.values())
        order = torch.randperm(len(scores)).tolist()  # no ids, and no order that could stand for one
        metrics[f"{split}.user-scores"] = [float(scores[i]) for i in order]
        metrics.update({f"{split}.stat.{k}": [float(x) for x in v] for k, v in r.stats.items()})
        examples += r.num_examples
    counts = {P.NUM_EXAMPLES: examples, P.NUM_USERS: len(t.users)}  # every user is evaluated
    if t.no_history:  # absent where 0: a reply from a client whose users all have a history is unchanged
        counts[P.NUM_NO_HISTORY] = len(t.no_history)
    out = reply(msg, {**counts, **metrics})
    out.content[P.INFO] = ConfigRecord({"task": t.spec.name})
    return out
