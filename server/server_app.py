"""Flower ServerApp: PROPER's stages in order, a checkpoint after every step.

  eval:base -> population:1..R (FedAvg by examples) -> eval:population
  -> group:1..R (GroupFedAvg) -> eval:group -> user (clients train locally, reply metrics only)
  -> eval:user -> the per-stage table

A step whose clients fail or time out goes on with the replies that came; every step records
which nodes answered, failed or stayed silent, and how many users the replies covered.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import Checkpoint
from server.mta import bank_record, mta_step
from server.strategy import (GroupFedAvg, mean_scalar_metrics, mixture_pool, population_strategy, schedule,
                             server_lr, visit_order)
from shared.runtime.config import to_yaml
from shared.data.lamp import task_spec
from shared.method.plan import stage_plan
from shared.runtime.results import STAGE_TITLES, RunDir, eval_rows, plot_mixtures, plot_stages
from shared.runtime.runconfig import run_config_from_context

log = logging.getLogger("proper.server")
app = ServerApp()


def content_order(reply: Message) -> str:
    """A key that orders replies by what they carry, not by when they arrived: FedAvg's float
    sums depend on the order of the clients, and a last-bit difference in the population LoRA
    became a visibly different group stage (Adam's first steps are about lr * sign(g)), so two
    identical runs, or a resumed one, disagreed when replies came back in another order."""
    h = hashlib.sha1()
    for name in sorted(reply.content.array_records):
        for key, array in reply.content.array_records[name].items():
            h.update(key.encode())
            h.update(array.data)
    return h.hexdigest()


class InjectedCrash(RuntimeError):
    """debug.crash_after: stop the server right after a step (to test --resume)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = run_config_from_context(context)
    FederatedRun(grid, cfg, run_dir).run()


class FederatedRun:
    def __init__(self, grid: Grid, cfg, run_dir):
        self.grid, self.cfg = grid, cfg
        self.run_dir = RunDir(run_dir)
        if not (self.run_dir.path / "config.yaml").exists():
            self.run_dir.write_config(to_yaml(cfg))
        self.ckpt = Checkpoint(run_dir)
        loaded = self.ckpt.load()
        if loaded:
            self.progress, self.parts = loaded
            log.info("resuming %s after %d steps (%s)", run_dir, len(self.progress["done"]),
                     self.progress["done"][-1] if self.progress["done"] else "-")
        else:
            self.progress = {"done": [], "evals": {}, "participation": {}}
            self.parts = {"population": None, "group": None, "mixtures": None}
        self.timeout = float(cfg.federation.timeout_s)

    def run(self):
        t0 = time.time()
        plan = stage_plan(self.cfg)
        if schedule(self.cfg) == "sequential" and any(server_lr(self.cfg, p) != 1.0 for p in ("population", "group")):
            log.warning("federation.schedule=sequential takes no server step: the server learning rate is unused")
        self.wait_for_nodes(int(self.cfg.federation.min_available_clients))
        for i, step in enumerate(plan, 1):
            if step in self.progress["done"]:
                continue
            log.info("[%d/%d] %s", i, len(plan), step)
            ts = time.time()
            kind, _, arg = step.partition(":")
            {"eval": self.evaluate, "population": self.population_round, "group": self.group_round,
             "mta": lambda step, arg: mta_step(self, step, arg),
             "user": self.user_stage}[kind](step, arg)
            self.progress["done"].append(step)
            self.progress.setdefault("seconds", {})[step] = time.time() - ts
            self.ckpt.save(self.progress, self.parts)
            if str(self.cfg.get("debug", {}).get("crash_after", "")) == step:
                raise InjectedCrash(f"debug.crash_after={step}")
        self.finish(time.time() - t0)

    def wait_for_nodes(self, minimum: int, limit_s: float = 600):
        deadline = time.time() + limit_s
        while len(list(self.grid.get_node_ids())) < minimum:
            if time.time() > deadline:
                raise TimeoutError(f"fewer than {minimum} SuperNodes connected after {limit_s} s")
            time.sleep(0.5)

    # ---- sending and hearing back
    def send(self, step: str, message_type: str, content: RecordDict) -> list[Message]:
        nodes = sorted(self.grid.get_node_ids())
        msgs = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
        return self.collect(step, msgs)

    def collect(self, step: str, msgs: list[Message]) -> list[Message]:
        """Send, wait up to the timeout, record who answered; return the good replies."""
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        # message ids are assigned on sending; a SuperLink-made error carries src_node_id 1
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        ok = sorted((r for r in replies if not r.has_error()), key=content_order)
        failed = [sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies if r.has_error()]
        answered = {sent.get(r.metadata.reply_to_message_id) for r in replies}
        silent = [n for n in sent.values() if n not in answered]
        for r in replies:
            if r.has_error():
                reason = (r.error.reason or "").strip().splitlines()
                log.warning("%s: a node failed: %s", step, reason[-1][:200] if reason else r.error.code)
        if silent:
            log.warning("%s: %d node(s) did not answer within %.0f s", step, len(silent), self.timeout)
        users = int(sum(int(r.content["metrics"].get("num-users", 0)) for r in ok))
        self.progress["participation"][step] = {"sent": len(msgs), "ok": len(ok), "failed": len(failed),
                                                "silent": len(silent), "users": users}
        return ok

    def _arrays(self, part: str) -> ArrayRecord:
        return ArrayRecord(self.parts[part]) if self.parts[part] else ArrayRecord()

    # ---- the stages
    def initial_parameters(self, step: str, part: str):
        """Ask one client for the seeded starting point of `part` (query.init): a server
        learning-rate step is taken from the parameters a round started from."""
        if self.parts[part] or server_lr(self.cfg, part) == 1.0:
            return
        content = RecordDict({"config": ConfigRecord({"part": part})})
        if part == "group":
            content["population"] = ArrayRecord(self.parts["population"])
        for node in sorted(self.grid.get_node_ids()):
            ok = self.collect(f"{step}/init", [Message(content, dst_node_id=node, message_type="query.init")])
            if ok:
                self.parts[part] = ok[0].content["arrays"].to_torch_state_dict()
                return
        raise RuntimeError(f"{step}: no client returned the initial {part} parameters")

    def population_round(self, step: str, rnd: str):
        if schedule(self.cfg) == "sequential":
            arrays, metrics, _ = self.sequential_round(step, int(rnd), "population")
            return self._train_done(step, arrays, metrics, "population")
        self.initial_parameters(step, "population")
        strategy = population_strategy(self.cfg)
        msgs = list(strategy.configure_train(int(rnd), self._arrays("population"), ConfigRecord(), self.grid))
        arrays, metrics = strategy.aggregate_train(int(rnd), self.collect(step, msgs))
        self._train_done(step, arrays, metrics, "population")

    def group_round(self, step: str, rnd: str):
        if not self.parts["population"]:
            raise RuntimeError("group stage without a population LoRA: every population round failed")
        if schedule(self.cfg) == "sequential":
            arrays, metrics, replies = self.sequential_round(step, int(rnd), "group")
            if replies:
                self.parts["mixtures"] = mixture_pool([r["routing"].to_torch_state_dict() for r in replies],
                                                      seed=int(self.cfg.seed) * 7919 + int(rnd))
            return self._train_done(step, arrays, metrics, "group")
        self.initial_parameters(step, "group")
        strategy = GroupFedAvg(self.parts["population"], self.parts["mixtures"], seed=int(self.cfg.seed),
                               server_learning_rate=server_lr(self.cfg, "group"),
                               fraction_train=float(self.cfg.federation.fraction_train), min_train_nodes=1,
                               min_available_nodes=int(self.cfg.federation.min_available_clients))
        msgs = list(strategy.configure_train(int(rnd), self._arrays("group"), ConfigRecord(), self.grid))
        arrays, metrics = strategy.aggregate_train(int(rnd), self.collect(step, msgs))
        if arrays is not None:
            self.parts["mixtures"] = strategy.mixtures
        self._train_done(step, arrays, metrics, "group")

    def sequential_round(self, step: str, rnd: int, part: str):
        """federation.schedule=sequential (cyclic weight transfer): the round visits its nodes one
        at a time in a seeded order, each training the parameters the node before it returned,
        so a round is as many sequential optimizer steps as a centralized pass over the same data
        (docs/decisions.md, "Schedule"). Messages and replies are those of the parallel schedule;
        a node that fails or stays silent is passed over. The round's result is the last reply's
        parameters; in the group stage the pool of mixtures is built from every reply."""
        nodes = visit_order(self.grid.get_node_ids(), int(self.cfg.seed), part, rnd,
                            float(self.cfg.federation.fraction_train))
        current, replies, tally = self.parts[part], [], {}
        t0 = last = time.time()
        for i, node in enumerate(nodes, 1):
            content = RecordDict({"arrays": ArrayRecord(current) if current else ArrayRecord(),
                                  "config": ConfigRecord({"server-round": rnd})})
            if part == "group":
                content["population"] = ArrayRecord(self.parts["population"])
                mixtures = self.parts["mixtures"]  # the previous round's pool, as in the parallel schedule
                content["others"] = ArrayRecord({"mixtures": mixtures}) if mixtures is not None else ArrayRecord()
            kind = "train" if part == "population" else "train.group"
            ok = self.collect(step, [Message(content, dst_node_id=node, message_type=kind)])
            for key, value in self.progress["participation"][step].items():
                tally[key] = tally.get(key, 0) + value
            if ok:
                current = ok[0].content["arrays"].to_torch_state_dict()
                replies.append(ok[0].content)
            if time.time() - last > 60 and i < len(nodes):
                last = time.time()
                log.info("%s: %d/%d nodes visited (%.0f s)", step, i, len(nodes), last - t0)
        self.progress["participation"][step] = tally
        if not replies:
            return None, None, []
        return ArrayRecord(current), mean_scalar_metrics(replies, "num-examples"), replies

    def _train_done(self, step, arrays, metrics, part):
        stage, _, rnd = step.partition(":")
        if arrays is None:
            log.warning("%s: no client succeeded; the %s parameters stay as they were", step, part)
            return
        self.parts[part] = arrays.to_torch_state_dict()
        m = dict(metrics or {})
        self.run_dir.log({"kind": "train", "stage": stage, "round": int(rnd), **m,
                          **{f"nodes_{k}": v for k, v in self.progress["participation"][step].items()}})
        log.info("%s: loss %.4f over %d examples", step, m.get("train_loss", float("nan")), m.get("num-examples", 0))

    def _model_content(self) -> RecordDict:
        if str(self.cfg.get("method", "proper")) == "mta":  # the meta-LoRA bank (server/mta.py)
            return RecordDict({"bank": bank_record(self)})
        return RecordDict({"population": self._arrays("population"), "arrays": self._arrays("group")})

    def user_stage(self, step: str, _):
        content = self._model_content()
        content["config"] = ConfigRecord({"stage": "user"})
        ok = self.send(step, "train.user", content)
        losses = [float(r.content["metrics"]["train_loss"]) for r in ok]
        self.run_dir.log({"kind": "train", "stage": "user", "round": 1,
                          "train_loss": float(np.mean(losses)) if losses else None,
                          **{f"nodes_{k}": v for k, v in self.progress["participation"][step].items()}})

    def evaluate(self, step: str, stage: str):
        splits = list(self.cfg.eval.splits)
        content = RecordDict() if stage == "base" else self._model_content()
        content["config"] = ConfigRecord({"stage": stage, "splits": ",".join(splits)})
        ok = self.send(step, "evaluate", content)
        by_split = {sp: {"stats": {}, "user_scores": []} for sp in splits}
        for r in ok:
            if "info" in r.content.config_records:
                self.progress["task"] = str(r.content["info"]["task"])
            for key, value in r.content["metrics"].items():
                split, _, name = key.partition(".")
                if split not in by_split:
                    continue
                if name == "user-scores":
                    by_split[split]["user_scores"] += list(value)
                elif name.startswith("stat."):
                    acc = by_split[split]["stats"]
                    acc[name[5:]] = (np.asarray(acc.get(name[5:], 0.0)) + np.asarray(value, float)).tolist()
        self.progress["evals"][stage] = by_split
        if ok:
            for row in eval_rows(self._spec(), {stage: by_split}):
                self.run_dir.log({"kind": "eval", "stage": stage, "split": row["split"], **row["metrics"],
                                  "users": row["users"]})
                log.info("eval %s (%s): %s", stage, row["split"],
                         "  ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()))

    def _spec(self):
        """The task: from the config, else as the clients reported it (the server holds no data)."""
        name = self.cfg.data.task or self.progress.get("task")
        if not name:
            raise RuntimeError("no client reported its task and data.task is not set: no evaluation succeeded")
        return task_spec(name)

    # ---- the table
    def finish(self, seconds: float):
        spec = self._spec()
        participation = self.progress["participation"]
        rows = eval_rows(spec, self.progress["evals"])
        for row in rows:
            p = participation.get(f"eval:{row['stage']}", {})
            row["nodes"] = f"{p.get('ok', '')}/{p.get('sent', '')}"
        trained = {}
        for step, p in participation.items():
            stage = step.partition(":")[0]
            if stage in ("population", "group", "user") and not step.endswith("/init"):  # init: one node asked
                trained[stage] = min(trained.get(stage, p["users"]), p["users"])
        notes = [f"task {spec.name}, predictions by {self.cfg.eval.mode}; method {self.cfg.get('method', 'proper')}; "
                 f"[lo, hi] = 95 % bootstrap CI of {spec.metrics[0]} over users",
                 "users = users evaluated; nodes = SuperNodes that answered / asked; users covered by training "
                 "(fewest over rounds): " + ", ".join(f"{STAGE_TITLES[s]} {n}" for s, n in trained.items()),
                 f"federated: {max((p['sent'] for p in participation.values()), default=0)} SuperNodes holding "
                 f"{max((p['users'] for p in participation.values()), default=0)} users; server wall time {seconds:.0f} s"]
        failures = {s: p for s, p in participation.items() if p["failed"] or p["silent"]}
        if failures:
            notes.append("steps with failed or silent nodes: " + "; ".join(
                f"{s}: {p['failed']} failed, {p['silent']} silent" for s, p in failures.items()))
        table = self.run_dir.write_table(rows, spec.metrics, notes)
        plot_stages(self.run_dir, rows, spec.metrics[0])
        if self.parts["mixtures"] is not None:
            plot_mixtures(self.run_dir, self.parts["mixtures"].numpy())
        log.info("results in %s", self.run_dir.path)
        print(table, flush=True)

