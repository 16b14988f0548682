"""Evaluation on the server: ask every client to evaluate a stage, add up the sufficient statistics
they reply (no ids, no predictions), and at the end write the per-stage table and plots."""
from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.federation import Federation
from server.privacy import privacy_note
from server.stages.user import model_content
from server.strategies import server_settings
from shared.data.lamp import task_spec
from shared.method.plan import BARE, Step
from shared.runtime import protocol as P
from shared.runtime.results import STAGE_TITLES, eval_rows, table_notes, write_results

log = logging.getLogger("proper.server")


def evaluate(fed: Federation, step: Step, mean_mixture):
    """step.arg: the stage evaluated. mean_mixture: the group stage's, how users with no history are
    routed (server/stages/group.py), sent with the group and user evaluations."""
    stage, splits = step.arg, list(fed.cfg.eval.splits)
    # the bare backbone (base; base-chat: asked through its chat template; rag: with each user's
    # retrieved items, which the clients retrieve themselves) needs no parameters
    content = RecordDict() if stage in BARE else model_content(fed)
    content[P.CONFIG] = ConfigRecord({"stage": stage, "splits": ",".join(splits)})
    mean = mean_mixture() if stage in ("group", "user") else None
    if mean is not None:
        content[P.MEAN_MIXTURE] = ArrayRecord({"mixture": mean})
    ok = fed.send(step.name, P.EVALUATE, content, nodes=fed.eval_nodes())
    no_history = sum(int(r.content[P.METRICS].get(P.NUM_NO_HISTORY, 0)) for r in ok)
    fed.progress.no_history = max(no_history, fed.progress.no_history)
    by_split = {sp: {"stats": {}, "user_scores": []} for sp in splits}
    for r in ok:
        if P.INFO in r.content.config_records:
            fed.progress.task = str(r.content[P.INFO]["task"])
        for key, value in r.content[P.METRICS].items():
            split, _, name = key.partition(".")
            if split not in by_split:
                continue
            if name == "user-scores":
                by_split[split]["user_scores"] += list(value)
            elif name.startswith("stat."):
                acc = by_split[split]["stats"]
                acc[name[5:]] = (np.asarray(acc.get(name[5:], 0.0)) + np.asarray(value, float)).tolist()
    fed.progress.evals[stage] = by_split
    if ok:
        for row in eval_rows(task_of(fed), {stage: by_split}):
            fed.run_dir.log({"kind": "eval", "stage": stage, "split": row["split"], **row["metrics"],
                             "users": row["users"]})
            log.info("eval %s (%s): %s", stage, row["split"],
                     "  ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()))


def task_of(fed: Federation):
    """The task: from the config, else as the clients reported it (the server holds no data)."""
    name = fed.cfg.data.task or fed.progress.task
    if not name:
        raise RuntimeError("no client reported its task and data.task is not set: no evaluation succeeded")
    return task_spec(name)


def client_compute(fed: Federation) -> str:
    """Client compute in passes over the users' training data: per round, the share of users whose
    clients trained times the stage's epochs (a chained round counts each client once)."""
    users, passes = fed.users_in_federation(), {}
    for stage, p in fed.progress.trained_steps():
        if users:
            passes[stage] = passes.get(stage, 0.0) + p["users"] / users * int(fed.cfg[stage].epochs)
    return ", ".join(f"{s} {v:.2f}" for s, v in passes.items())


def finish(fed: Federation, seconds: float):
    spec, participation = task_of(fed), fed.progress.participation
    rows = eval_rows(spec, fed.progress.evals)
    for row in rows:
        p = participation.get(Step("eval", row["stage"]).name, {})
        row["nodes"] = f"{p.get('ok', '')}/{p.get('sent', '')}"
    trained = {}
    for stage, p in fed.progress.trained_steps():
        trained[stage] = min(trained.get(stage, p["users"]), p["users"])
    how_run = ["users = users evaluated; nodes = SuperNodes that answered / asked; users covered by training "
               "(fewest over rounds): " + (", ".join(f"{STAGE_TITLES[s]} {n}" for s, n in trained.items())
                                           or "none, nothing trained"),
               f"federated: {max((p['sent'] for p in participation.values()), default=0)} {hosts(fed)} holding "
               f"{max((p['users'] for p in participation.values()), default=0)} users; {schedule_note(fed)}; "
               f"server wall time {seconds:.0f} s" if fed.cfg.eval.clients is None else
               f"federated: {len(fed.nodes())} {hosts(fed)} holding about {fed.users_in_federation()} users; "
               f"evaluated, and trained in stage 3: a fixed sample of {fed.cfg.eval.clients} clients "
               f"(eval.clients, drawn by eval.sample_seed {fed.cfg.eval.sample_seed}: the same in every run); "
               f"{schedule_note(fed)}; server wall time {seconds:.0f} s",
               f"client compute in passes over the training data (users trained x epochs): "
               f"{client_compute(fed) or 'none'}"]
    failures = {s: p for s, p in participation.items() if p["failed"] or p["silent"]}
    findings = ["steps with failed or silent nodes: " + "; ".join(
        f"{s}: {p['failed']} failed, {p['silent']} silent" for s, p in failures.items())] if failures else []
    # the privacy note is also written to rounds.jsonl (server/privacy.py)
    notes = table_notes(spec, fed.cfg, how_run, fed.progress.no_history, findings, privacy_note(fed))
    table = write_results(fed.run_dir, spec, rows, notes, fed.parts.group.mixtures)
    log.info("results in %s", fed.run_dir.path)
    print(table, flush=True)


def hosts(fed: Federation) -> str:
    """What the clients were: SuperNodes, or virtual clients served by M SuperNodes."""
    m = fed.cfg.simulation.virtual_clients
    return f"virtual clients (on {m} SuperNodes)" if m else "SuperNodes"


def schedule_note(fed: Federation) -> str:
    f = fed.cfg.federation
    sampled = f.clients_per_round or f"{float(f.fraction_train):g} of the nodes"
    opts = ", ".join(f"{s} {o['server_opt']} (lr {o['server_lr']:g})"
                     for s, o in ((s, server_settings(fed.cfg, s)) for s in ("population", "group")))
    schedule = "one chain per client" if not f.chains else f"{f.chains} chain(s)"
    return f"{schedule}, {sampled} per round; server optimizer: {opts}"
