"""What crosses the wire: one JSON line per reply a client sends (names, shapes, sizes, and the
config/metric keys; array values are never written). Used by privacy studies and by the test
that checks the privacy invariant."""
from __future__ import annotations

import json
import os
from pathlib import Path


def describe_reply(reply) -> dict:
    if reply.has_error():
        return {"error": True}
    c = reply.content
    arrays = {name: {k: {"shape": list(a.shape), "bytes": len(a.data)} for k, a in rec.items()}
              for name, rec in c.array_records.items()}
    metrics = {name: {k: (v if isinstance(v, (int, float)) else {"list": len(v)}) for k, v in rec.items()}
               for name, rec in c.metric_records.items()}
    configs = {name: dict(rec.items()) for name, rec in c.config_records.items()}
    return {"arrays": arrays, "metrics": metrics, "configs": configs,
            "bytes": sum(a["bytes"] for rec in arrays.values() for a in rec.values())}


def record_reply(out_dir: Path, msg, reply, context):
    out_dir.mkdir(parents=True, exist_ok=True)
    entry = {"message_type": msg.metadata.message_type, "node": int(context.node_id),
             **describe_reply(reply)}
    # One file per process: appends from one process never interleave mid-line.
    with open(out_dir / f"replies-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
