"""Hostile clients, for the tests and the attack study of the server's reply checks and robust
aggregation (docs/results/reliability.md): debug.attack_partitions corrupt the replies of their
population and group rounds as debug.attack says, after training honestly.

  nan             every value of the shared part is NaN
  scale           the update (reply minus what was sent) sent debug.attack_scale times over
  sign_flip       the update sent with its sign flipped
  claim_examples  num-examples claimed as 10^6 (weight in an average bought)
  shape           one array of the shared part loses its last column
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message

from shared.runtime import protocol as P
from shared.runtime.runconfig import run_config_from_context

ATTACKED = (P.TRAIN_POPULATION, P.TRAIN_GROUP)


def hostile_mod(msg: Message, context: Context, call_next) -> Message:
    out = call_next(msg, context)
    dbg = run_config_from_context(context)[0].debug
    part = int(context.node_config.get("partition-id", -1))
    if dbg.attack is None or part not in list(dbg.attack_partitions) or out.has_error() or \
            msg.metadata.message_type not in ATTACKED:
        return out
    if dbg.attack == "claim_examples":
        out.content[P.METRICS][P.NUM_EXAMPLES] = 10 ** 6
        return out
    sent = msg.content[P.ARRAYS].to_torch_state_dict() if P.ARRAYS in msg.content.array_records else {}
    out.content[P.ARRAYS] = ArrayRecord(corrupt(out.content[P.ARRAYS].to_torch_state_dict(), sent,
                                                dbg.attack, float(dbg.attack_scale)))
    return out


def corrupt(reply: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], attack: str,
            scale: float) -> dict[str, torch.Tensor]:
    if attack == "shape":
        first = next(iter(reply))
        return {**reply, first: reply[first][..., :-1].contiguous()}
    out = {}
    for key, value in reply.items():
        start = sent.get(key, torch.zeros_like(value))
        if attack == "nan":
            out[key] = torch.full_like(value, float("nan"))
        elif attack == "scale":
            out[key] = start + scale * (value - start)
        else:   # sign_flip
            out[key] = start - (value - start)
    return out
