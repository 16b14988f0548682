"""Stage 3 on the server: nothing to aggregate. Every client gets the shared parts (the population
LoRA and the group part; under MTA the bank) and trains its users' LoRAs and LoRA-aware routers
privately; it replies metrics only, and the user stage's state stays on the clients."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from server.mta import bank_record
from shared.method.plan import Step
from shared.runtime import protocol as P

if TYPE_CHECKING:
    from server.federation import Federation


def model_content(fed: Federation) -> RecordDict:
    """The shared parts as every later step sends them: to the user stage and to the evaluations."""
    if fed.method == "mta":  # the meta-LoRA bank (server/mta.py)
        return RecordDict({P.BANK: bank_record(fed)})
    return RecordDict({P.POPULATION: fed.arrays("population"), P.ARRAYS: fed.arrays("group")})


def user_stage(fed: Federation, step: Step):
    content = model_content(fed)
    content[P.CONFIG] = ConfigRecord({"stage": "user"})
    ok = fed.send(step.name, P.TRAIN_USER, content, nodes=fed.eval_nodes())   # eval.clients: the sample
    # a client whose users all have no history trains none of them and sends no loss
    losses = [float(r.content[P.METRICS]["train_loss"]) for r in ok if "train_loss" in r.content[P.METRICS]]
    fed.log_train(step, {"train_loss": float(np.mean(losses)) if losses else None})
