"""What every ClientApp handler needs, PROPER's and MTA's alike: which users this node holds, its
ClientTrainer (one per process at a time), record helpers and fault injection for tests.

Which users a node holds: node_config "data-path" (a deployment: the LaMP files of this client's
users) or, in simulation, partition-id / num-partitions over the run's data with
federation.users_per_client users per node. Private state lives under node_config "state-dir"
(default <run dir>/clients/<partition-id>). The backbone is loaded once per process.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.data import all_users, load_users, users_of_partition
from client.trainer import ClientTrainer
from shared.method.plan import Step
from shared.method.signature_start import refuse_in_federation
from shared.runtime import protocol as P
from shared.runtime.process import PROCESS
from shared.runtime.runconfig import run_config_from_context

__all__ = ["all_users", "users_of_partition", "inject_faults", "arrays_to_evaluate", "simulated_state_dir",
           "note_ray_node", "trainer_for", "arrays_in", "config_of", "server_round", "reply"]


def inject_faults(cfg, context: Context, stage: str, run_dir: Path | None = None):
    """debug.fail_partitions / debug.slow_partitions (with *_stages): make a client raise or
    stall in a stage, to test that the federation goes on without it. A stalled client answers once
    the server has gone on without it (a step of `stage` in its checkpoint) or after
    debug.slow_seconds, whichever comes first: it is late whatever the machine's speed, and the
    test waits no longer than the server's timeout."""
    dbg = cfg.debug
    if not (dbg.fail_partitions or dbg.slow_partitions):
        return
    part = int(context.node_config.get("partition-id", -1))
    if part in list(dbg.fail_partitions) and stage in list(dbg.fail_stages):
        raise RuntimeError(f"injected failure: partition {part}, stage {stage}")
    if part in list(dbg.slow_partitions) and stage in list(dbg.slow_stages):
        progress = None if run_dir is None else Path(run_dir) / "checkpoint" / "progress.json"
        deadline = time.monotonic() + float(dbg.slow_seconds)
        while time.monotonic() < deadline and not _server_went_on(progress, stage):
            time.sleep(0.2)


def _server_went_on(progress: Path | None, stage: str) -> bool:
    try:
        done = json.loads(progress.read_text())["done"] if progress is not None else []
    except (OSError, ValueError, KeyError):   # not written yet, or being replaced
        return False
    return any(Step.parse(step).kind == stage for step in done)


def arrays_to_evaluate(msg: Message, name: str) -> dict[str, torch.Tensor] | None:
    """arrays_in for an evaluate message, converted once per record: the virtual clients of a bundle
    share one record (client/virtual.py), and converting it for each of them cost about what
    predicting a tiny model's query does. Evaluation only reads these tensors."""
    rec = msg.content.array_records.get(name)
    if rec is None or len(rec) == 0:
        return None
    hit = PROCESS.eval_arrays.get(name)
    if hit is None or hit[0] is not rec:
        PROCESS.eval_arrays[name] = hit = (rec, rec.to_torch_state_dict())
    return hit[1]


def simulated_state_dir(node_config, run_dir, partition: int) -> str:
    """A simulated client's private state: node_config "state-dir", else <run dir>/clients/<partition>."""
    return str(node_config.get("state-dir") or Path(run_dir) / "clients" / f"{partition:05d}")


def note_ray_node(cfg, run_dir, context: Context):
    """debug.record_nodes: append "<Ray node id> <partition>" to <run dir>/ray_nodes/<pid>.txt, so a
    test can tell on which nodes of a Ray cluster the clients ran (tests/test_ray_cluster.py)."""
    if not cfg.debug.record_nodes:
        return
    import ray
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "no-ray"
    out = Path(run_dir) / "ray_nodes"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{os.getpid()}.txt", "a") as f:
        f.write(f"{node} {context.node_config.get('partition-id', '')}\n")


def trainer_for(context: Context, stage: str) -> ClientTrainer:
    cfg, run_dir = run_config_from_context(context)
    inject_faults(cfg, context, stage, run_dir)
    note_ray_node(cfg, run_dir, context)
    nc = context.node_config
    key = (str(run_dir), tuple(sorted((k, str(v)) for k, v in nc.items())))
    if PROCESS.trainer is None or PROCESS.trainer[0] != key:
        if "data-path" in nc:  # a real client: its own users' files
            spec, users = load_users(cfg, str(nc["data-path"]))
            # one subdirectory per run (named as the server's run dir, so a resumed run finds its
            # state): a later run must not start from an earlier run's embeddings or user LoRAs
            state_dir = (str(Path(str(nc["state-dir"])) / Path(run_dir).name) if nc.get("state-dir")
                         else str(Path(run_dir) / "clients" / Path(str(nc["data-path"])).name))
            client_seed, keep_shared, data_path = 0, True, str(nc["data-path"])
        else:
            part, n_parts = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
            spec, everyone = all_users(cfg)
            users = users_of_partition(everyone, part, n_parts, int(cfg.federation.users_per_client))
            state_dir = simulated_state_dir(nc, run_dir, part)
            client_seed, keep_shared = part, False  # the run directory gets one copy (sim/run.py)
            data_path = None
        refuse_in_federation(cfg, spec)
        PROCESS.trainer = None  # one client's users at a time per process keeps memory flat at scale
        PROCESS.trainer = (key, ClientTrainer(cfg, spec, users, state_dir, client_seed=client_seed,
                                              keep_shared=keep_shared, federated=True, data_path=data_path))
    return PROCESS.trainer[1]


def arrays_in(msg: Message, name: str) -> dict[str, torch.Tensor] | None:
    rec = msg.content.array_records.get(name)
    if rec is None or len(rec) == 0:
        return None
    return rec.to_torch_state_dict()


def config_of(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(P.CONFIG, ConfigRecord())


def server_round(msg: Message) -> int:
    return int(config_of(msg).get(P.SERVER_ROUND, 1))


def reply(msg: Message, metrics: dict, arrays: dict[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({P.METRICS: MetricRecord(dict(metrics))})
    for name, rec in (arrays or {}).items():
        content[name] = rec
    return Message(content, reply_to=msg)
