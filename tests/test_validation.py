"""The server's reply checks (server/validation.py) on hand-made replies: each malformed kind is
dropped with its reason, honest replies pass untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from server.validation import ReplyBounds, check_reply, screen
from shared.runtime import protocol as P

pytestmark = pytest.mark.usefixtures("task_identity")

LORA = {"l0.lora_A": np.zeros((4, 8), np.float32), "l0.lora_B": np.zeros((8, 4), np.float32)}


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def sent(arrays=LORA, mtype=P.TRAIN_POPULATION, node=7):
    return Message(RecordDict({P.ARRAYS: record(arrays)}),
                   dst_node_id=node, message_type=mtype)


def reply_to(msg, arrays=None, scale=0.1, seed=0, **metrics):
    rng = np.random.default_rng(seed)
    arrays = arrays if arrays is not None else {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype)
                                                 for k, v in LORA.items()}
    content = RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 8, P.NUM_USERS: 1, "train_loss": 1.5, **metrics})})
    if arrays:
        content[P.ARRAYS] = record(arrays)
    return Message(content, reply_to=msg)


def test_an_honest_reply_passes():
    m = sent()
    assert check_reply(m, reply_to(m), ReplyBounds(max_examples=100)) is None


@pytest.mark.parametrize("arrays, metrics, reason", [
    ({**LORA, "l0.lora_A": np.full((4, 8), np.nan, np.float32)}, {}, "non-finite values"),
    ({**LORA, "l0.lora_A": np.zeros((4, 9), np.float32)}, {}, "key 'l0.lora_A' is float32 [4, 9]"),
    ({**LORA, "l0.lora_A": np.zeros((4, 8), np.float64)}, {}, "expected float32"),
    ({"l0.lora_A": LORA["l0.lora_A"]}, {}, "keys differ"),
    ({**LORA, "extra": np.zeros(2, np.float32)}, {}, "keys differ"),
    (None, {P.NUM_EXAMPLES: 10 ** 6}, "over the cap of 100"),
    (None, {P.NUM_EXAMPLES: -3}, "is not a count"),
    (None, {P.NUM_EXAMPLES: 2.5}, "is not a count"),
    (None, {"train_loss": float("inf")}, "metric 'train_loss': non-finite"),
])
def test_each_malformed_kind_is_named(arrays, metrics, reason):
    m = sent()
    r = reply_to(m, arrays=arrays, **metrics)
    got = check_reply(m, r, ReplyBounds(max_examples=100))
    assert got is not None and reason in got, got


def test_missing_and_unexpected_records():
    m = sent()
    assert "missing record(s) ['arrays']" in check_reply(m, reply_to(m, arrays={}), ReplyBounds())
    u = Message(RecordDict({P.POPULATION: ArrayRecord()}), dst_node_id=3, message_type=P.TRAIN_USER)
    r = reply_to(u, arrays=LORA)   # a user-stage reply must carry metrics only
    assert "unexpected record(s) ['arrays']" in check_reply(u, r, ReplyBounds())


def test_routing_bounds():
    m = sent(mtype=P.TRAIN_GROUP)
    r = reply_to(m)
    r.content[P.ROUTING] = record({"routing_mass": np.array([[1.0, -2.0]], np.float32),
                                   "mixtures": np.zeros((1, 1, 2), np.float32)})
    assert check_reply(m, r, ReplyBounds()) == "negative routing mass"
    r.content[P.ROUTING] = record({"routing_mass": np.ones((1, 2), np.float32),
                                   "mixtures": np.full((1, 1, 2), 3.0, np.float32)})
    assert check_reply(m, r, ReplyBounds()) == "user mixtures outside [0, 1]"


def test_a_first_round_is_checked_against_the_most_common_reply():
    """A message that sent no shared part (the clients' seeded start): the layout to match is the
    one most replies carry."""
    pairs = []
    for node in range(4):
        m = sent(arrays={}, node=node)
        pairs.append((m, reply_to(m, seed=node)))
    m = sent(arrays={}, node=9)
    pairs.append((m, reply_to(m, arrays={"l0.lora_A": np.zeros((2, 2), np.float32)})))
    kept, dropped = screen(pairs, ReplyBounds())
    assert len(kept) == 4 and len(dropped) == 1 and "keys differ" in dropped[0][1]


def test_the_norm_bound_drops_a_scaled_update_only():
    pairs = []
    for node in range(5):
        m = sent(node=node)
        pairs.append((m, reply_to(m, seed=node, scale=100.0 if node == 3 else 0.1)))
    kept, dropped = screen(pairs, ReplyBounds(norm_bound=10.0))
    assert [n for n, _ in dropped] == [pairs[3][0].metadata.dst_node_id] and len(kept) == 4
    assert "over 10 x the step's median" in dropped[0][1]
    kept, dropped = screen(pairs, ReplyBounds())   # off: every well-formed reply is kept
    assert len(kept) == 5 and not dropped
