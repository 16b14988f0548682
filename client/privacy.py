"""privacy.dp.clipping=client: the client clips its own update before it leaves (docs/decisions.md
"Privacy"). The server's DifferentialPrivacyClientSideFixedClipping puts the clipping norm into the
round's config record ("clipping_norm"); only a message that carries it is clipped.

  train.population  Flower's fixedclipping_mod, as it is: the reply's population LoRA minus the one
                    received, scaled to norm <= C (the reply's keys put in the order they were sent,
                    which the mod requires)
  train.group       the same clipping (Flower's compute_clip_model_update) on the joint update of
                    experts and routers: fixedclipping_mod refuses messages with more than one
                    ArrayRecord, and a group message carries three (the part, the population LoRA, the
                    pool of mixtures), a group reply two (the part, the routing statistics)
"""
from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from shared.runtime import protocol as P


def dp_clip_mod(msg: Message, context: Context, call_next) -> Message:
    config = msg.content.config_records.get(P.CONFIG)
    kind = msg.metadata.message_type
    if config is None or KEY_CLIPPING_NORM not in config or kind not in (P.TRAIN_POPULATION, P.TRAIN_GROUP):
        return call_next(msg, context)
    if kind == P.TRAIN_POPULATION:
        return fixedclipping_mod(msg, context, _in_sent_order(msg, call_next))
    out = call_next(msg, context)
    if out.has_error():
        return out
    sent = msg.content[P.ARRAYS]
    keys = list(sent.keys())
    reply = out.content[P.ARRAYS]
    if set(reply.keys()) != set(keys):
        raise ValueError("train.group: the reply's group part has other keys than the one received")
    update, before = [reply[k].numpy() for k in keys], [sent[k].numpy() for k in keys]
    if any((u != b).any() for u, b in zip(update, before)):   # Flower's clipping divides by the norm
        compute_clip_model_update(update, before, float(config[KEY_CLIPPING_NORM]))
    out.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in zip(keys, update)})
    return out


def _in_sent_order(msg: Message, call_next):
    """call_next, with the reply's parameters in the order of the message's."""
    def ordered(m: Message, context: Context) -> Message:
        out = call_next(m, context)
        if not out.has_error():
            reply, keys = out.content[P.ARRAYS], list(msg.content[P.ARRAYS].keys())
            if set(reply.keys()) == set(keys):
                out.content[P.ARRAYS] = ArrayRecord({k: reply[k] for k in keys})
        return out
    return ordered
