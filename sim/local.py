"""`proper local`: the centralized reference, one client holding every user, in one process.

The same runner as the ServerApp takes the method's steps (shared/runtime/runner.py); here each step
calls the same ClientTrainer as the Flower ClientApp, directly, where the ServerApp sends messages
and averages the replies (which, with one client, are that client's parameters): the federated run
and this one differ only in how users are spread over clients.
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
from shared.method.plan import Step, stage_plan
from shared.runtime.config import to_yaml
from shared.runtime.persist import export_peft_adapter, save_group
from shared.runtime.precision import use_bf16
from shared.runtime.results import RunDir, eval_rows, table_notes, write_results
from shared.runtime.rules import ConfigError
from shared.runtime.runner import run

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
    if cfg.eval.clients is not None:
        raise ConfigError("eval.clients samples a federation's clients for evaluation; `proper local` has one "
                          "client holding every user: drop eval.clients (or data.max_users to evaluate fewer)")
    local = LocalRun(cfg, run_path)
    run(stage_plan(cfg), local)
    return local.rows


class LocalRun:
    """The runner's backend for `proper local`: every step calls the one ClientTrainer directly (no
    averaging: a one-client average (x * n) / n would change the last bits), and the shared parts
    stay here between steps."""

    def __init__(self, cfg: DictConfig, run_path: str | Path):
        self.t0 = time.time()
        self.cfg, self.run_dir = cfg, RunDir(run_path)
        cfg.data.path = prepare_data(cfg, self.run_dir.path)
        self.run_dir.write_config(to_yaml(cfg))
        self.spec, self.users = load_users(cfg)
        log.info("%d users, task %s; loading backbone %s", len(self.users), self.spec.name, cfg.model.name)
        if not any(u.train for u in self.users):  # users with no history are served, but someone must train
            raise LampDataError(f"{cfg.data.path}: every user's profile is empty, nothing to train on")
        self.client = ClientTrainer(cfg, self.spec, self.users, str(self.run_dir.path / "client_state"))
        self.mta_client = self.bank = None
        if cfg.method == "mta":  # Merge-then-Adapt: client/mta.py
            from client.mta import MTAClient
            self.mta_client = MTAClient(self.client)
        self.evals, self.per_user = {}, {u.user_id: {} for u in self.users}
        self.groups, self.recovery = read_groups(cfg.data.path), None   # known groups: synthetic users only
        self.pop = self.group_part = self.others = self.mixtures = None
        self.rows: list[dict] = []

    def done(self, step: Step) -> bool:
        return False

    def after(self, step: Step, seconds: float):
        pass

    def population(self, step: Step):
        res = self.client.population(self.pop, step.round)
        self.pop = res.shared
        self.run_dir.log({"kind": "train", "stage": "population", "round": step.round, **res.metrics})
        log.info("population round %d/%d  loss %.3f  %.0f tok/s", step.round, self.cfg.population.rounds,
                 res.metrics["train_loss"], res.metrics["tokens_per_s"])

    def group(self, step: Step):
        res = self.client.group(self.pop, self.group_part, self.others, step.round)
        self.group_part, self.others, self.mixtures = res.shared, res.mixtures, res.mixtures
        self.run_dir.log({"kind": "train", "stage": "group", "round": step.round, **res.metrics})
        log.info("group round %d/%d  loss %.3f  constraint %.3f  %.0f tok/s", step.round, self.cfg.group.rounds,
                 res.metrics["train_loss"], res.metrics["constraint_loss"], res.metrics["tokens_per_s"])
        if self.groups is not None:
            self.recovery = _group_recovery(self.client, self.groups, self.per_user, step.round, self.run_dir)

    def user(self, step: Step):
        m = self.client.user(self.pop, self.group_part)
        self.run_dir.log({"kind": "train", "stage": "user", "round": 1, **m})
        log.info("user stage: %d users, loss %.3f (%.0f s)", len(self.users), m["train_loss"], m["train_seconds"])

    def mta(self, step: Step):
        from client.mta import local_step
        self.bank = local_step(self.mta_client, step.arg, self.bank, self.run_dir)

    def evaluate(self, step: Step):
        stage, mixtures = step.arg, self.mixtures
        for split in self.cfg.eval.splits:
            t = time.time()
            # users with no history are served with the mean of the trained users' mixtures
            mean = None if mixtures is None or not len(mixtures) else mixtures.float().mean(0)
            r = self.mta_client.evaluate(stage, self.bank, split) if stage.startswith("mta") else \
                self.client.evaluate(stage, self.pop, self.group_part, split=split, mean_mixture=mean)
            self.evals.setdefault(stage, {})[split] = {"stats": {k: v.tolist() for k, v in r.stats.items()},
                                                       "user_scores": list(r.user_scores.values())}
            for uid, score in r.user_scores.items():
                self.per_user[uid][f"{stage}@{split}"] = score
            m = stats_metrics(self.spec, r.stats)
            self.run_dir.log({"kind": "eval", "stage": stage, "split": split, **m, "seconds": time.time() - t})
            log.info("eval %-10s %-4s %s  (%.0f s)", stage, split, _fmt(m), time.time() - t)

    def finish(self, seconds: float):
        cfg, run_dir, spec = self.cfg, self.run_dir, self.spec
        # artifacts: the shared model (the per-user adapters stay in client_state/)
        if self.pop is not None:
            export_peft_adapter(self.client.model, "population", run_dir.path / "population_lora",
                                base_model=cfg.model.name)
        if self.group_part is not None:
            save_group(self.client.model, run_dir.path / "group.safetensors")
        self.rows = rows = eval_rows(spec, self.evals)
        how_run = [f"wall time {time.time() - self.t0:.1f} s, one client holding all {len(self.users)} users "
                   f"(proper local); {'bfloat16 autocast' if use_bf16(cfg.train.bf16) else 'float32'} "
                   f"(train.bf16={cfg.train.bf16})"]
        findings = [recovery_note(self.recovery)] if self.recovery is not None else []
        notes = table_notes(spec, cfg, how_run, len(self.client.no_history), findings,
                            "privacy: no formal DP (proper local is centralized: privacy.dp applies to federated runs)")
        table = write_results(run_dir, spec, rows, notes, self.mixtures)
        columns = list(dict.fromkeys(k for scores in self.per_user.values() for k in scores))
        # the scores per stage first, then the dominant expert (present with known groups only)
        run_dir.write_per_user(self.per_user, sorted(columns, key=lambda c: c == "expert"))
        print(table, flush=True)


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
