"""`proper local`: the centralized reference, one client holding every user, in one process.

It calls the same ClientTrainer as the Flower ClientApp and the same aggregation as the
ServerApp (which, with one client, returns that client's parameters), so the federated run and
this one differ only in how users are spread over clients.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from client.trainer import ClientTrainer, load_users
from shared.data.lamp import LampDataError
from shared.evaluation.groups import MIXTURES_FILE, group_recovery, read_groups, read_user_mixtures, recovery_note
from shared.evaluation.metrics import stats_metrics
from shared.method.plan import stage_plan
from shared.runtime.config import to_yaml
from shared.runtime.persist import export_peft_adapter, save_group
from shared.runtime.precision import use_bf16
from shared.runtime.results import RunDir, eval_rows, no_history_note, plot_mixtures, plot_stages

log = logging.getLogger("proper.local")


def prepare_data(cfg: DictConfig, run_dir: Path) -> str:
    """The data path, generating synthetic users first when the config asks for them."""
    if str(cfg.data.path).endswith("synthetic"):
        from shared.data.synthetic import write_synthetic_lamp
        syn = dict(cfg.data.synthetic or {})
        # data.synthetic.task picks the generator (LaMP_2 tags, LaMP_4 headlines); absent = LaMP_2
        syn["task"] = syn.get("task", "LaMP_2")
        out = run_dir / "synthetic_data"
        if not (out / "questions.json").exists():
            write_synthetic_lamp(out, seed=cfg.seed, **syn)
        return str(out)
    return cfg.data.path


def run_local(cfg: DictConfig, run_path: str | Path) -> list[dict]:
    t0 = time.time()
    run = RunDir(run_path)
    cfg.data.path = prepare_data(cfg, run.path)
    run.write_config(to_yaml(cfg))
    spec, users = load_users(cfg)
    log.info("%d users, task %s; loading backbone %s", len(users), spec.name, cfg.model.name)
    if not any(u.train for u in users):  # users with no history are served, but someone must train
        raise LampDataError(f"{cfg.data.path}: every user's profile is empty, nothing to train on")
    client = ClientTrainer(cfg, spec, users, str(run.path / "client_state"))
    mta = bank = None
    if cfg.method == "mta":  # Merge-then-Adapt: client/mta.py
        from client.mta import MTAClient
        from client.mta import local_step as mta_step
        mta = MTAClient(client)
    splits = list(cfg.eval.splits)
    evals, per_user = {}, {u.user_id: {} for u in users}
    groups, recovery = read_groups(cfg.data.path), None   # known groups: synthetic users only

    def evaluate(stage, pop=None, group=None):
        for split in splits:
            t = time.time()
            # users with no history are served with the mean of the trained users' mixtures
            mean = None if mixtures is None or not len(mixtures) else mixtures.float().mean(0)
            r = mta.evaluate(stage, bank, split) if stage.startswith("mta") else \
                client.evaluate(stage, pop, group, split=split, mean_mixture=mean)
            evals.setdefault(stage, {})[split] = {"stats": {k: v.tolist() for k, v in r.stats.items()},
                                                  "user_scores": list(r.user_scores.values())}
            for uid, score in r.user_scores.items():
                per_user[uid][f"{stage}@{split}"] = score
            m = stats_metrics(spec, r.stats)
            run.log({"kind": "eval", "stage": stage, "split": split, **m, "seconds": time.time() - t})
            log.info("eval %-10s %-4s %s  (%.0f s)", stage, split, _fmt(m), time.time() - t)

    pop = group = others = mixtures = None
    for step in stage_plan(cfg):
        kind, arg = step.kind, step.arg
        if kind == "eval":
            evaluate(arg, pop, group)
        elif kind == "population":
            res = client.population(pop, int(arg))
            pop = res.shared
            run.log({"kind": "train", "stage": "population", "round": int(arg), **res.metrics})
            log.info("population round %s/%d  loss %.3f  %.0f tok/s", arg, cfg.population.rounds,
                     res.metrics["train_loss"], res.metrics["tokens_per_s"])
        elif kind == "group":
            res = client.group(pop, group, others, int(arg))
            group, others, mixtures = res.shared, res.mixtures, res.mixtures
            run.log({"kind": "train", "stage": "group", "round": int(arg), **res.metrics})
            log.info("group round %s/%d  loss %.3f  constraint %.3f  %.0f tok/s", arg, cfg.group.rounds,
                     res.metrics["train_loss"], res.metrics["constraint_loss"], res.metrics["tokens_per_s"])
            if groups is not None:
                recovery = _group_recovery(client, groups, per_user, int(arg), run)
        elif kind == "mta":
            bank = mta_step(mta, arg, bank, run)
        elif kind == "user":
            m = client.user(pop, group)
            run.log({"kind": "train", "stage": "user", "round": 1, **m})
            log.info("user stage: %d users, loss %.3f (%.0f s)", len(users), m["train_loss"], m["train_seconds"])

    # artifacts: the shared model (the per-user adapters stay in client_state/)
    if pop is not None:
        export_peft_adapter(client.model, "population", run.path / "population_lora", base_model=cfg.model.name)
    if group is not None:
        save_group(client.model, run.path / "group.safetensors")
    rows = eval_rows(spec, evals)
    notes = [f"task {spec.name}, predictions by {cfg.eval.mode}; method {cfg.method}; "
             f"[lo, hi] = 95 % bootstrap CI of {spec.metrics[0]} over users",
             f"wall time {time.time() - t0:.1f} s, one client holding all {len(users)} users (proper local); "
             f"{'bfloat16 autocast' if use_bf16(cfg.train.bf16) else 'float32'} (train.bf16={cfg.train.bf16})"]
    if client.no_history:
        notes.append(no_history_note(len(client.no_history)))
    if recovery is not None:
        notes.append(recovery_note(recovery))
    notes.append("privacy: no formal DP (proper local is centralized: privacy.dp applies to federated runs)")
    table = run.write_table(rows, spec.metrics, notes)
    columns = list(dict.fromkeys(k for scores in per_user.values() for k in scores))
    # the scores per stage first, then the dominant expert (present with known groups only)
    run.write_per_user(per_user, sorted(columns, key=lambda c: c == "expert"))
    plot_stages(run, rows, spec.metrics[0])
    if mixtures is not None and len(mixtures):
        plot_mixtures(run, mixtures.numpy())
    print(table, flush=True)
    return rows


def _group_recovery(client: ClientTrainer, groups: dict, per_user: dict, rnd: int, run: RunDir) -> dict:
    """ARI and purity of the users' dominant experts after group round `rnd`, against the data's
    groups.json; each user's dominant expert goes to per_user.csv (column "expert")."""
    mixtures = read_user_mixtures(client.store.root / MIXTURES_FILE)
    experts = {uid: m["expert"] for uid, m in mixtures.items()}
    for uid, e in experts.items():
        per_user[uid]["expert"] = e
    rec = group_recovery(experts, groups)
    run.log({"kind": "groups", "stage": "group", "round": rnd, **rec})
    log.info("group round %d: group recovery ARI %.3f, purity %.3f (%d users, %d experts used)",
             rnd, rec["ari"], rec["purity"], rec["users"], rec["experts_used"])
    return {**rec, "round": rnd}


def _fmt(m: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in m.items())
