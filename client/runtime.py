"""What every ClientApp handler needs, PROPER's and MTA's alike: which users this node holds, its
ClientTrainer (one per process at a time), record helpers and fault injection for tests.

Which users a node holds: node_config "data-path" (a deployment: the LaMP files of this client's
users) or, in simulation, partition-id / num-partitions over the run's data with
federation.users_per_client users per node. Private state lives under node_config "state-dir"
(default <run dir>/clients/<partition-id>). The backbone is loaded once per process.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from client.trainer import ClientTrainer, load_users
from shared.method.signatures import refuse_in_federation
from shared.runtime import protocol as P
from shared.runtime.runconfig import run_config_from_context

_TRAINERS: dict[tuple, ClientTrainer] = {}
_DATA: dict[tuple, tuple] = {}


def users_of_partition(users: list, partition: int, num_partitions: int, per_client: int) -> list:
    """Contiguous blocks of `per_client` users, in file order; the last node may hold fewer."""
    need = math.ceil(len(users) / per_client)
    if num_partitions != need:
        raise ValueError(f"{len(users)} users at {per_client} per client need {need} SuperNodes, "
                         f"the federation has {num_partitions}")
    return users[partition * per_client:(partition + 1) * per_client]


def inject_faults(cfg, context: Context, stage: str):
    """debug.fail_partitions / debug.slow_partitions (with *_stages): make a client raise or
    stall in a stage, to test that the federation goes on without it."""
    dbg = cfg.get("debug") or {}
    if not (dbg.get("fail_partitions") or dbg.get("slow_partitions")):
        return
    part = int(context.node_config.get("partition-id", -1))
    if part in list(dbg.get("fail_partitions") or []) and stage in list(dbg.get("fail_stages") or []):
        raise RuntimeError(f"injected failure: partition {part}, stage {stage}")
    if part in list(dbg.get("slow_partitions") or []) and stage in list(dbg.get("slow_stages") or []):
        time.sleep(float(dbg.get("slow_seconds", 10)))


def all_users(cfg):
    """The run's users, parsed once per process: a simulation process serves many SuperNodes, and
    parsing every user's file for each of them made a round quadratic in users (bench/scale.py)."""
    if _DATA_OF and _DATA_OF[0] is cfg:   # the apps' shared read-only config: no key to build per client
        return _DATA_OF[1]
    d = cfg.data
    key = tuple(str(d.get(k)) for k in ("path", "task", "holdout", "max_users", "longest", "template"))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_users(cfg)
    _DATA_OF[:] = [cfg, _DATA[key]] if OmegaConf.is_readonly(cfg) else []
    return _DATA[key]


_DATA_OF: list = []   # [read-only config, its users]


def arrays_to_evaluate(msg: Message, name: str) -> dict[str, torch.Tensor] | None:
    """arrays_in for an evaluate message, converted once per record: the virtual clients of a bundle
    share one record (client/virtual.py), and converting it for each of them cost about what
    predicting a tiny model's query does. Evaluation only reads these tensors."""
    rec = msg.content.array_records.get(name)
    if rec is None or len(rec) == 0:
        return None
    hit = _EVAL_ARRAYS.get(name)
    if hit is None or hit[0] is not rec:
        _EVAL_ARRAYS[name] = hit = (rec, rec.to_torch_state_dict())
    return hit[1]


_EVAL_ARRAYS: dict[str, tuple] = {}   # record name -> (the last record converted, its tensors)


def simulated_state_dir(node_config, run_dir, partition: int) -> str:
    """A simulated client's private state: node_config "state-dir", else <run dir>/clients/<partition>."""
    return str(node_config.get("state-dir") or Path(run_dir) / "clients" / f"{partition:05d}")


def note_ray_node(cfg, run_dir, context: Context):
    """debug.record_nodes: append "<Ray node id> <partition>" to <run dir>/ray_nodes/<pid>.txt, so a
    test can tell on which nodes of a Ray cluster the clients ran (tests/test_ray_cluster.py)."""
    if not (cfg.get("debug") or {}).get("record_nodes"):
        return
    import ray
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "no-ray"
    out = Path(run_dir) / "ray_nodes"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{os.getpid()}.txt", "a") as f:
        f.write(f"{node} {context.node_config.get('partition-id', '')}\n")


def trainer_for(context: Context, stage: str) -> ClientTrainer:
    cfg, run_dir = run_config_from_context(context)
    inject_faults(cfg, context, stage)
    note_ray_node(cfg, run_dir, context)
    nc = context.node_config
    key = (str(run_dir), tuple(sorted((k, str(v)) for k, v in nc.items())))
    if key not in _TRAINERS:
        if "data-path" in nc:  # a real client: its own users' files
            spec, users = load_users(cfg, str(nc["data-path"]))
            # one subdirectory per run (named as the server's run dir, so a resumed run finds its
            # state): a later run must not start from an earlier run's embeddings or user LoRAs
            state_dir = (str(Path(str(nc["state-dir"])) / Path(run_dir).name) if nc.get("state-dir")
                         else str(Path(run_dir) / "clients" / Path(str(nc["data-path"])).name))
            client_seed, keep_shared = 0, True
        else:
            part, n_parts = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
            spec, everyone = all_users(cfg)
            users = users_of_partition(everyone, part, n_parts, int(cfg.federation.users_per_client))
            state_dir = simulated_state_dir(nc, run_dir, part)
            client_seed, keep_shared = part, False  # the run directory gets one copy (sim/run.py)
        refuse_in_federation(cfg, spec)
        _TRAINERS.clear()  # one client's users at a time per process keeps memory flat at scale
        _TRAINERS[key] = ClientTrainer(cfg, spec, users, state_dir, client_seed=client_seed, keep_shared=keep_shared)
        _TRAINERS[key].federated = True
    return _TRAINERS[key]


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
