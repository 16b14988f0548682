"""Flower ClientApp: one handler per PROPER stage (Message API, flwr 1.41).

  train             stage 1: population LoRA in -> population LoRA, num-examples, metrics out
  train.group       stage 2: experts + routers in (+ others' mixtures) -> experts + routers,
                    routing mass, this client's users' mixtures (shuffled, no ids), metrics out
  train.user        stage 3: the final group model in -> metrics only out
  query.init        the seeded starting point of a shared part (for a server learning rate)
  evaluate          any stage: its parameters in -> sufficient statistics + per-user scores out

Which users a node holds: node_config "data-path" (a deployment: the LaMP files of this client's
users) or, in simulation, partition-id / num-partitions over the run's data with
federation.users_per_client users per node. Private state lives under node_config "state-dir"
(default <run dir>/clients/<partition-id>). The backbone is loaded once per process.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.trainer import ClientTrainer, load_users
from shared.runtime.runconfig import run_config_from_context



def reply_audit_mod(msg: Message, context: Context, call_next) -> Message:
    """With federation.audit_replies, write what each reply carries to <run dir>/wire/: record
    names, keys, shapes and bytes (never values), so anyone can see what crosses the wire."""
    out = call_next(msg, context)
    cfg, run_dir = run_config_from_context(context)
    if cfg.federation.get("audit_replies"):
        from client.audit import record_reply
        record_reply(Path(run_dir) / "wire", msg, out, context)
    return out


app = ClientApp(mods=[reply_audit_mod])

_TRAINERS: dict[tuple, ClientTrainer] = {}


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
    part = int(context.node_config.get("partition-id", -1))
    if part in list(dbg.get("fail_partitions") or []) and stage in list(dbg.get("fail_stages") or []):
        raise RuntimeError(f"injected failure: partition {part}, stage {stage}")
    if part in list(dbg.get("slow_partitions") or []) and stage in list(dbg.get("slow_stages") or []):
        time.sleep(float(dbg.get("slow_seconds", 10)))


_DATA: dict[tuple, tuple] = {}


def _all_users(cfg):
    """The run's users, parsed once per process: a simulation process serves many SuperNodes, and
    parsing every user's file for each of them made a round quadratic in users (bench/scale.py)."""
    d = cfg.data
    key = tuple(str(d.get(k)) for k in ("path", "task", "holdout", "max_users", "longest", "template"))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_users(cfg)
    return _DATA[key]


def trainer_for(context: Context, stage: str) -> ClientTrainer:
    cfg, run_dir = run_config_from_context(context)
    inject_faults(cfg, context, stage)
    nc = context.node_config
    key = (str(run_dir), tuple(sorted((k, str(v)) for k, v in nc.items())))
    if key not in _TRAINERS:
        if "data-path" in nc:  # a real client: its own users' files
            spec, users = load_users(cfg, str(nc["data-path"]))
            # one subdirectory per run (named as the server's run dir, so a resumed run finds its
            # state): a later run must not start from an earlier run's embeddings or user LoRAs
            state_dir = (str(Path(str(nc["state-dir"])) / Path(run_dir).name) if nc.get("state-dir")
                         else str(Path(run_dir) / "clients" / Path(str(nc["data-path"])).name))
            client_seed = 0
        else:
            part, n_parts = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
            spec, all_users = _all_users(cfg)
            users = users_of_partition(all_users, part, n_parts, int(cfg.federation.users_per_client))
            state_dir = str(nc.get("state-dir") or Path(run_dir) / "clients" / f"{part:05d}")
            client_seed = part
        _TRAINERS.clear()  # one client's users at a time per process keeps memory flat at scale
        _TRAINERS[key] = ClientTrainer(cfg, spec, users, state_dir, client_seed=client_seed)
    return _TRAINERS[key]


def arrays_in(msg: Message, name: str) -> dict[str, torch.Tensor] | None:
    rec = msg.content.array_records.get(name)
    if rec is None or len(rec) == 0:
        return None
    return rec.to_torch_state_dict()


def reply(msg: Message, metrics: dict, arrays: dict[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({k: v for k, v in metrics.items()})})
    for name, rec in (arrays or {}).items():
        content[name] = rec
    return Message(content, reply_to=msg)


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


@app.train()
def population(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "population")
    rnd = int(_config(msg).get("server-round", 1))
    r = t.population(arrays_in(msg, "arrays"), rnd)
    metrics = {"num-examples": r.num_examples, "num-users": len(t.users), **r.metrics}
    return reply(msg, metrics, {"arrays": ArrayRecord(r.shared)})


@app.train("group")
def group(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "group")
    rnd = int(_config(msg).get("server-round", 1))
    others = arrays_in(msg, "others")
    r = t.group(arrays_in(msg, "population"), arrays_in(msg, "arrays"),
                None if others is None else others["mixtures"], rnd)
    metrics = {"num-examples": r.num_examples, "num-users": len(t.users), **r.metrics}
    stats = ArrayRecord({"routing_mass": r.routing_mass, "mixtures": r.mixtures})
    return reply(msg, metrics, {"arrays": ArrayRecord(r.shared), "routing": stats})


@app.query("init")
def initial_parameters(msg: Message, context: Context) -> Message:
    """query.init: the seeded starting point of the population LoRA or of the group part, which
    the server needs before a first round with federation.server_lr != 1 (no user data used)."""
    t = trainer_for(context, "init")
    part = str(_config(msg).get("part", "population"))
    arrays = t.initial(part, arrays_in(msg, "population"))
    return reply(msg, {"num-users": len(t.users)}, {"arrays": ArrayRecord(arrays)})


@app.train("user")
def user(msg: Message, context: Context) -> Message:
    t = trainer_for(context, "user")
    m = t.user(arrays_in(msg, "population"), arrays_in(msg, "arrays"))
    return reply(msg, {"num-examples": sum(len(u.train) for u in t.users), "num-users": len(t.users), **m})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    t = trainer_for(context, "eval")
    stage = str(cfg.get("stage", "base"))
    metrics, examples = {}, 0
    for split in str(cfg.get("splits", "test")).split(","):
        r = mta.evaluate_message(t, stage, msg, split) if stage.startswith("mta") else \
            t.evaluate(stage, arrays_in(msg, "population"), arrays_in(msg, "arrays"), split=split)
        scores = list(r.user_scores.values())
        order = torch.randperm(len(scores)).tolist()  # no ids, and no order that could stand for one
        metrics[f"{split}.user-scores"] = [float(scores[i]) for i in order]
        metrics.update({f"{split}.stat.{k}": [float(x) for x in v] for k, v in r.stats.items()})
        examples += r.num_examples
    out = reply(msg, {"num-examples": examples, "num-users": len(t.users), **metrics})
    out.content["info"] = ConfigRecord({"task": t.spec.name})
    return out


# method=mta (Merge-then-Adapt): query.mta_candidates, train.mta_anchor, train.mta_user (client/mta.py)
from client import mta  # noqa: E402
mta.register(app)
