"""Server learning-rate sweep for cross-device PROPER: a round's client work done once, the server
step tried at several learning rates.

In a round every client starts from the same parameters, so what the clients return does not
depend on the server learning rate; only the server's step start + lr * (average - start) does.
This tool runs the round's clients in one process (one ClientTrainer per user, as in `proper sim`
with one SuperNode per user: the same seeds, the same aggregation functions as the ServerApp),
caches the average, and evaluates every lr asked for at a stage's last round. The federated run it
stands for is then checked with `proper sim` (docs/results/lamp2.md, "Federated vs local").

  python -m bench.server_lr_sweep -c lamp2_sample --out runs/sweep --population-lrs 8 16 32 72
  python -m bench.server_lr_sweep population.batch_size=1 -c lamp2_sample --out runs/b1 --population-lrs 8 16
  python -m bench.server_lr_sweep -c lamp2_sample --out runs/sweep --population-lr 32 --group-lrs 16 32 72
  python -m bench.server_lr_sweep -c lamp2_sample --out runs/sweep --population-lr 32 --group-lr 32 --user

Config overrides (key=value) go before the options. Rounds before a stage's last one use that stage's chosen lr; every result goes to <out>/sweep.jsonl.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from client.trainer import ClientTrainer, load_users
from server.strategy import group_aggregate, server_step
from shared.method.aggregate import weighted_average
from shared.runtime.config import load_config
from shared.evaluation.evaluate import add_stats, stats_metrics
from shared.runtime.persist import load_tensors, save_tensors

log = logging.getLogger("proper.sweep")


class Sweep:
    def __init__(self, cfg, out: Path):
        self.cfg, self.out = cfg, out
        self.spec, users = load_users(cfg)
        self.users = users
        self.chain = "init"   # the lrs chosen so far: names the cache files and client state dirs

    def trainers(self) -> list[ClientTrainer]:
        # one client per user, partition i -> client_seed i, as client/client_app.py does it
        root = self.out / f"clients-{self.chain}"
        return [ClientTrainer(self.cfg, self.spec, [u], str(root / str(i)), client_seed=i)
                for i, u in enumerate(self.users)]

    def _cached(self, name: str, compute):
        path = self.out / f"{self.chain}-{name}.safetensors"
        if path.exists():
            return load_tensors(path)[0]
        t = time.time()
        tensors = compute()
        save_tensors(path, tensors)
        log.info("%s: %d clients in %.0f s", name, len(self.users), time.time() - t)
        return tensors

    @staticmethod
    def _split(tensors: dict, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def train_population(self, rnd: int, start: dict | None):
        def compute():
            ts = self.trainers()
            s = start if start is not None else ts[0].initial("population")
            res = [t.population(s, rnd) for t in ts]
            avg = weighted_average([r.shared for r in res], [r.num_examples for r in res])
            return {**{f"start.{k}": v for k, v in s.items()}, **{f"avg.{k}": v for k, v in avg.items()}}
        t = self._cached(f"population{rnd}", compute)
        return self._split(t, "start."), self._split(t, "avg.")

    def train_group(self, rnd: int, pop: dict, start: dict | None, others: torch.Tensor | None):
        def compute():
            ts = self.trainers()
            s = start if start is not None else ts[0].initial("group", pop)
            res = [t.group(pop, s, others, rnd) for t in ts]
            routing = [{"routing_mass": r.routing_mass, "mixtures": r.mixtures} for r in res]
            agg, pool = group_aggregate([r.shared for r in res], routing, [r.num_examples for r in res],
                                        seed=int(self.cfg.seed) * 7919 + rnd)
            return {**{f"start.{k}": v for k, v in s.items()}, **{f"avg.{k}": v for k, v in agg.items()},
                    "pool": pool}
        t = self._cached(f"group{rnd}", compute)
        return self._split(t, "start."), self._split(t, "avg."), t["pool"]

    def evaluate(self, stage: str, pop=None, group=None) -> dict[str, dict]:
        out = {}
        ts = self.trainers()
        for split in self.cfg.eval.splits:
            stats = None
            for t in ts:
                if getattr(t.users[0], split):
                    stats = add_stats(stats, t.evaluate(stage, pop, group, split=split).stats)
            out[split] = stats_metrics(self.spec, stats)
        return out

    def record(self, **row):
        row["time"] = time.time()
        with open(self.out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s", json.dumps(row))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="lamp2_sample")
    ap.add_argument("--out", required=True)
    ap.add_argument("--population-lrs", type=float, nargs="*", default=[])
    ap.add_argument("--population-lr", type=float)
    ap.add_argument("--group-lrs", type=float, nargs="*", default=[])
    ap.add_argument("--group-lr", type=float)
    ap.add_argument("--user", action="store_true", help="train and evaluate the user stage after the group stage")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(a.config, a.overrides)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sim.local import prepare_data
    cfg.data.path = prepare_data(cfg, out)
    sw = Sweep(cfg, out)

    pop, R = None, int(cfg.population.rounds)
    for rnd in range(1, R + 1):
        start, avg = sw.train_population(rnd, pop)
        if rnd == R:
            for lr in a.population_lrs:
                sw.record(stage="population", round=rnd, chain=sw.chain, lr=lr,
                          **sw.evaluate("population", server_step(start, avg, lr)))
            if a.population_lr is None or not (a.group_lrs or a.group_lr is not None):
                return 0
        elif a.population_lr is None:
            raise SystemExit("--population-lr: needed for the rounds before the last")
        pop = server_step(start, avg, a.population_lr)
        sw.chain += f"_p{a.population_lr:g}"

    group, pool, G = None, None, int(cfg.group.rounds)
    for rnd in range(1, G + 1):
        start, avg, pool = sw.train_group(rnd, pop, group, pool)
        if rnd == G:
            for lr in a.group_lrs:
                sw.record(stage="group", round=rnd, chain=sw.chain, lr=lr,
                          **sw.evaluate("group", pop, server_step(start, avg, lr)))
            if a.group_lr is None or not a.user:
                return 0
        elif a.group_lr is None:
            raise SystemExit("--group-lr: needed for the rounds before the last")
        group = server_step(start, avg, a.group_lr)
        before, sw.chain = sw.chain, sw.chain + f"_g{a.group_lr:g}"
        # the clients' e_u after this round go on with the chosen lr's chain
        if not (out / f"clients-{sw.chain}").exists():
            shutil.copytree(out / f"clients-{before}", out / f"clients-{sw.chain}")

    if a.user:
        for t in sw.trainers():
            t.user(pop, group)
        sw.record(stage="user", chain=sw.chain, **sw.evaluate("user", pop, group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
