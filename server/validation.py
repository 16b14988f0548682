"""The server trusts no reply: each one is checked against the message it answers before any stage
reads it. A reply that fails is dropped and named (node and reason); the step goes on with the rest.

Checks of one reply, in order; the first that fails is the reason given:
  records   the records its message type's reply carries (REPLY), and no other
  arrays    a record about a shared part has exactly the keys, shapes and dtypes of the part the
            message sent; where the message sent none (a first round from the clients' seeded
            start), those of the most common reply of the step
  finite    every array and every metric value is finite
  counts    counts are whole and non-negative; a training reply's num-examples at most the cap the
            server sets (federation.max_examples), so that weight in an average cannot be bought
  routing   routing mass non-negative, user mixtures in [0, 1] (not under privacy.mixtures=noise:
            noised mixtures leave [0, 1] by design)
Then, over the replies of a step that passed: an update (reply minus what was sent) whose norm is
over federation.norm_bound times the step's median is dropped (off where norm_bound is null).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from shared.runtime import protocol as P

# what each message type's reply must carry: array records, and whether a metrics record is due
REPLY = {
    P.TRAIN_POPULATION: {P.ARRAYS},
    P.TRAIN_GROUP: {P.ARRAYS, P.ROUTING},
    P.TRAIN_USER: set(),
    P.QUERY_INIT: {P.ARRAYS},
    P.QUERY_MIXTURES: {P.ROUTING},
    P.EVALUATE: set(),
}
# array records whose keys, shapes and dtypes must be those of the shared part the message sent
SHARED = (P.ARRAYS,)
COUNTS = (P.NUM_EXAMPLES, P.NUM_USERS, P.NUM_NO_HISTORY)
# training replies whose num-examples weighs them in an average: the examples cap applies to these
# (an evaluation's count is of its queries, which weigh nothing)
WEIGHTED = (P.TRAIN_POPULATION, P.TRAIN_GROUP)


@dataclass(frozen=True)
class ReplyBounds:
    """What the server accepts. max_examples: the most examples one reply may claim (None: no cap);
    norm_bound: an update may be at most this times the step's median update norm (None: off)."""
    max_examples: int | None = None
    norm_bound: float | None = None
    noised_mixtures: bool = False   # privacy.mixtures=noise: mixtures are not held to [0, 1]


def layout(record) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of an ArrayRecord, without reading its values."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in record.items()}


def check_reply(sent: Message, reply: Message, bounds: ReplyBounds,
                reference: dict[str, dict] | None = None) -> str | None:
    """The reason `reply` cannot be used, or None. reference: record -> layout, for shared records
    the message did not carry (the step's most common reply layout)."""
    mtype = sent.metadata.message_type
    content = reply.content
    arrays = set(content.array_records)
    want = REPLY.get(mtype)
    if want is not None:
        if missing := want - arrays:
            return f"missing record(s) {sorted(missing)}"
        if extra := arrays - want:
            return f"unexpected record(s) {sorted(extra)}"
    if P.METRICS not in content.metric_records:
        return "no metrics record"
    for name in SHARED:
        if name not in arrays:
            continue
        expected = layout(sent.content[name]) if name in sent.content.array_records and \
            len(sent.content[name]) else (reference or {}).get(name)
        if expected is not None and (got := layout(content[name])) != expected:
            return f"record {name!r}: {layout_difference(expected, got)}"
    for name in arrays:
        for key, arr in content[name].items():
            values = arr.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"record {name!r} key {key!r}: non-finite values"
    metrics = content[P.METRICS]
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metric {key!r}: non-finite"
    for key in COUNTS:
        if key in metrics:
            v = metrics[key]
            if isinstance(v, list) or float(v) < 0 or float(v) != int(v):
                return f"metric {key!r}: {v!r} is not a count"
    n = metrics.get(P.NUM_EXAMPLES)
    if bounds.max_examples is not None and n is not None and mtype in WEIGHTED and int(n) > bounds.max_examples:
        return f"claims {int(n)} examples, over the cap of {bounds.max_examples} (federation.max_examples)"
    if P.ROUTING in arrays:
        routing = content[P.ROUTING]
        if "routing_mass" in routing and (routing["routing_mass"].numpy() < 0).any():
            return "negative routing mass"
        if "mixtures" in routing and not bounds.noised_mixtures:
            m = routing["mixtures"].numpy()
            if m.size and ((m < 0).any() or (m > 1).any()):
                return "user mixtures outside [0, 1]"
    return None


def layout_difference(expected: dict, got: dict) -> str:
    if set(expected) != set(got):
        miss, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        return f"keys differ (missing {miss[:3]}, unexpected {extra[:3]})"
    key = next(k for k in expected if expected[k] != got[k])
    return f"key {key!r} is {got[key][1]} {list(got[key][0])}, expected {expected[key][1]} {list(expected[key][0])}"


def update_norm(sent: Message, reply: Message) -> float | None:
    """The norm of what the client changed in the shared part: reply minus what was sent (the reply
    itself where nothing was sent). None where the reply carries no shared part."""
    if P.ARRAYS not in reply.content.array_records:
        return None
    start = sent.content[P.ARRAYS] if P.ARRAYS in sent.content.array_records else {}
    total = 0.0
    for key, arr in reply.content[P.ARRAYS].items():
        v = arr.numpy().astype(np.float64)
        if key in start:
            v = v - start[key].numpy().astype(np.float64)
        total += float(np.square(v).sum())
    return math.sqrt(total)


def screen(pairs: list[tuple[Message, Message]], bounds: ReplyBounds) -> tuple[list[Message], list[tuple[int, str]]]:
    """The usable replies of one step and the dropped ones as (node, reason). pairs: (sent, reply)
    for every reply that is not an error."""
    reference = {}
    for name in SHARED:   # the step's most common layout, for messages that sent no shared part
        seen = [tuple(sorted(layout(r.content[name]).items())) for _, r in pairs if name in r.content.array_records]
        if seen:
            reference[name] = dict(Counter(seen).most_common(1)[0][0])
    kept, dropped = [], []
    for sent, reply in pairs:
        reason = check_reply(sent, reply, bounds, reference)
        if reason is None:
            kept.append((sent, reply))
        else:
            dropped.append((reply.metadata.src_node_id, reason))
    if bounds.norm_bound is not None and len(kept) > 1:
        norms = [update_norm(s, r) for s, r in kept]
        known = [n for n in norms if n is not None]
        if known and float(np.median(known)) > 0:
            limit = float(bounds.norm_bound) * float(np.median(known))
            out = []
            for (s, r), n in zip(kept, norms):
                if n is not None and n > limit:
                    dropped.append((r.metadata.src_node_id,
                                    f"update norm {n:.3g} over {bounds.norm_bound:g} x the step's median"))
                else:
                    out.append((s, r))
            kept = out
    return [r for _, r in kept], dropped
