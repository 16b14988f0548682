"""Evaluation on the server: ask every client to evaluate a stage, add up the sufficient statistics
they reply (no ids, no predictions), and at the end write the per-stage table and plots."""
from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.federation import Federation
from server.privacy import privacy_note
from server.stages import model_content
from shared.data.lamp import task_spec
from shared.method.plan import BASE_CHAT
from shared.runtime import protocol as P
from shared.runtime.results import STAGE_TITLES, eval_rows, no_history_note, plot_mixtures, plot_stages

log = logging.getLogger("proper.server")


def evaluate(fed: Federation, step: str, stage: str):
    splits = list(fed.cfg.eval.splits)
    # the bare backbone (base, and base-chat: asked through its chat template) needs no parameters
    content = RecordDict() if stage in ("base", BASE_CHAT) else model_content(fed)
    content[P.CONFIG] = ConfigRecord({"stage": stage, "splits": ",".join(splits)})
    mean = mean_mixture(fed) if stage in ("group", "user") else None
    if mean is not None:
        content[P.MEAN_MIXTURE] = ArrayRecord({"mixture": mean})
    ok = fed.send(step, P.EVALUATE, content)
    no_history = sum(int(r.content[P.METRICS].get(P.NUM_NO_HISTORY, 0)) for r in ok)
    fed.progress["no_history"] = max(no_history, int(fed.progress.get("no_history", 0)))
    by_split = {sp: {"stats": {}, "user_scores": []} for sp in splits}
    for r in ok:
        if P.INFO in r.content.config_records:
            fed.progress["task"] = str(r.content[P.INFO]["task"])
        for key, value in r.content[P.METRICS].items():
            split, _, name = key.partition(".")
            if split not in by_split:
                continue
            if name == "user-scores":
                by_split[split]["user_scores"] += list(value)
            elif name.startswith("stat."):
                acc = by_split[split]["stats"]
                acc[name[5:]] = (np.asarray(acc.get(name[5:], 0.0)) + np.asarray(value, float)).tolist()
    fed.progress["evals"][stage] = by_split
    if ok:
        for row in eval_rows(task_of(fed), {stage: by_split}):
            fed.run_dir.log({"kind": "eval", "stage": stage, "split": row["split"], **row["metrics"],
                             "users": row["users"]})
            log.info("eval %s (%s): %s", stage, row["split"],
                     "  ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()))


def mean_mixture(fed: Federation):
    """[L, k], how users with no history are routed, or None (no group part).

    The mean of the trained users' mixtures: the mean of the pool every group round's clients
    already receive, so nothing new leaves the server. privacy.mixtures=noise: that mean with its
    negative weights cut and its rows summed to 1 again (post-processing of what was released).
    privacy.mixtures=local: no pool exists; every expert weighs the same."""
    pool, how = fed.parts.get("mixtures"), fed.cfg.privacy.get("mixtures", "share")
    if pool is not None and len(pool):
        mean = pool.float().mean(0)
        if how == "noise":
            mean = mean.clamp_min(0)
            mean = mean / mean.sum(-1, keepdim=True).clamp_min(1e-12)
        return mean
    group = fed.parts.get("group")
    if how != "local" or fed.method != "proper" or not group:
        return None
    routers = [v for key, v in group.items() if key.endswith(".router_h")]
    return torch.full((len(routers), int(routers[0].shape[0])), 1.0 / int(routers[0].shape[0]))


def task_of(fed: Federation):
    """The task: from the config, else as the clients reported it (the server holds no data)."""
    name = fed.cfg.data.task or fed.progress.get("task")
    if not name:
        raise RuntimeError("no client reported its task and data.task is not set: no evaluation succeeded")
    return task_spec(name)


def client_compute(fed: Federation) -> str:
    """Client compute in passes over the users' training data: per round, the share of users whose
    clients trained times the stage's epochs (a chained round counts each client once)."""
    users = max((p["users"] for s, p in fed.progress["participation"].items() if s.startswith("eval:")), default=0)
    passes = {}
    for step, p in fed.progress["participation"].items():
        stage = step.partition(":")[0]
        if stage in ("population", "group", "user") and "/" not in step and users:
            passes[stage] = passes.get(stage, 0.0) + p["users"] / users * int(fed.cfg[stage].get("epochs", 1))
    return ", ".join(f"{s} {v:.2f}" for s, v in passes.items())


def finish(fed: Federation, seconds: float):
    spec = task_of(fed)
    participation = fed.progress["participation"]
    rows = eval_rows(spec, fed.progress["evals"])
    for row in rows:
        p = participation.get(f"eval:{row['stage']}", {})
        row["nodes"] = f"{p.get('ok', '')}/{p.get('sent', '')}"
    trained = {}
    for step, p in participation.items():
        stage = step.partition(":")[0]
        if stage in ("population", "group", "user") and "/" not in step:  # "/init", "/pool": queries
            trained[stage] = min(trained.get(stage, p["users"]), p["users"])
    notes = [f"task {spec.name}, predictions by {fed.cfg.eval.mode}; method {fed.method}; "
             f"[lo, hi] = 95 % bootstrap CI of {spec.metrics[0]} over users",
             "users = users evaluated; nodes = SuperNodes that answered / asked; users covered by training "
             "(fewest over rounds): " + ", ".join(f"{STAGE_TITLES[s]} {n}" for s, n in trained.items()),
             f"federated: {max((p['sent'] for p in participation.values()), default=0)} {hosts(fed)} holding "
             f"{max((p['users'] for p in participation.values()), default=0)} users; {schedule_note(fed)}; "
             f"server wall time {seconds:.0f} s",
             f"client compute in passes over the training data (users trained x epochs): {client_compute(fed)}"]
    if fed.progress.get("no_history"):
        notes.append(no_history_note(int(fed.progress["no_history"])))
    failures = {s: p for s, p in participation.items() if p["failed"] or p["silent"]}
    if failures:
        notes.append("steps with failed or silent nodes: " + "; ".join(
            f"{s}: {p['failed']} failed, {p['silent']} silent" for s, p in failures.items()))
    notes.append(privacy_note(fed))   # also written to rounds.jsonl (server/privacy.py)
    table = fed.run_dir.write_table(rows, spec.metrics, notes)
    plot_stages(fed.run_dir, rows, spec.metrics[0])
    if fed.parts["mixtures"] is not None:
        plot_mixtures(fed.run_dir, fed.parts["mixtures"].numpy())
    log.info("results in %s", fed.run_dir.path)
    print(table, flush=True)


def hosts(fed: Federation) -> str:
    """What the clients were: SuperNodes, or virtual clients served by M SuperNodes."""
    m = (fed.cfg.get("simulation") or {}).get("virtual_clients")
    return f"virtual clients (on {m} SuperNodes)" if m else "SuperNodes"


def schedule_note(fed: Federation) -> str:
    from server.strategies import server_settings
    f = fed.cfg.federation
    chains = f.get("chains")
    sampled = f.get("clients_per_round") or (f"{float(f.get('fraction_train', 1.0)):g} of the nodes")
    opts = ", ".join(f"{s} {o['server_opt']} (lr {o['server_lr']:g})"
                     for s, o in ((s, server_settings(fed.cfg, s)) for s in ("population", "group")))
    schedule = "one chain per client" if not chains else f"{chains} chain(s)"
    return f"{schedule}, {sampled} per round; server optimizer: {opts}"
