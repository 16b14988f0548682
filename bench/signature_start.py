"""How well does the signature start recover known groups, centralized and federated, per number of codes?

    python -m bench.signature_start -c lamp2_sample --data <proper synth dir> --population <LoRA> \
        --k 5 --codes 10,15,20 --seeds 0,1,2 [--prior 0.25,0.5] [--out <dir>]

The population LoRA is a run's population_lora/ (PEFT adapter directory) or group_ablation's cached
population.safetensors. Every training item is read once by that population model (the readings the
group stage's signature start uses, cached in <out>/readings.safetensors); then, per number of codes
and seed, the users are clustered two ways from the same readings and scored by ARI against the
data's groups.json (one row per number of codes and prior of the answer maps; the prior
defaults to the config's group.signature_prior):

  centralized  what `proper local` does: k-means over all items (best of 10 k-means++ starts), EM
               for k answer maps (best of 20 starts, to convergence): shared/method/answer_signatures.py
  federated    what `proper sim` / `proper server` do with one user per client: k-means from the
               answers' mean readings for KMEANS_ROUNDS Lloyd rounds of per-client sums, then
               EM with EM_RESTARTS starts to convergence (federated_answer_maps), step for step
               as server/signature_rounds.py and client/signature_replies.py compute them over messages

No training: a row costs seconds once the readings are cached. The table goes to stdout and, with
--out, to <out>/signature_start.md and .json.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from client.trainer import ClientTrainer, load_users
from shared.evaluation.groups import adjusted_rand_index, read_groups
from shared.method import answer_signatures as A
from shared.method import signature_sums as S
from shared.runtime.config import load_config, stage_cfg
from shared.runtime.persist import atomic_write_text, load_tensors, read_peft_adapter, save_tensors

log = logging.getLogger("bench.signature_start")


def population_of(model, path: Path) -> dict:
    if path.is_dir():
        return read_peft_adapter(model, "population", path)
    return load_tensors(path)[0]


def source_key(population: Path, data_path) -> str:
    """What the cached readings were read from: a digest of the population LoRA's bytes and the data's
    path (a cache read from another LoRA or data set is not reused)."""
    import hashlib
    h = hashlib.sha256(str(Path(data_path).resolve()).encode())
    for f in sorted(population.rglob("*")) if population.is_dir() else [population]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def readings(cfg, spec, users, population: Path, cache: Path | None):
    """(readings [N, H], answers [N] in the task's answer set, who [N]) of every training item,
    cached in `cache` under the population LoRA's and the data's key (source_key)."""
    key = source_key(population, cfg.data.path)
    if cache is not None and cache.exists():
        t, meta = load_tensors(cache)
        if meta.get("source") == key:
            return t["readings"], t["answers"], t["who"]
        log.info("%s was read from another population LoRA or data set: reading the items again", cache)
    with tempfile.TemporaryDirectory() as state:
        client = ClientTrainer(cfg, spec, users, state)
        client.prepare("group", population_of(client.model, population))
        users = A.without_canaries(client.trained)
        inp, _, who = A.item_readings(client.model, client.tokenizer, users, int(stage_cfg(cfg, "group").max_len))
    answers = S.answer_index(spec, [x.output for u in users for x in u.train])
    if cache is not None:
        save_tensors(cache, {"readings": inp.float(), "answers": answers, "who": who}, {"source": key})
    return inp, answers, who


def centralized(inp, answers, who, n_users: int, n_answers: int, k: int, codes: int, seed: int,
                prior: float) -> list[int]:
    kinds = torch.as_tensor(A.best_kmeans(A.centred_directions(inp), codes, seed, 10))
    counts = S.user_counts(kinds, answers, who, n_users, codes, n_answers)
    return A.answer_maps(counts, k, seed, 20, prior=prior).tolist()


def federated(inp, answers, who, keys: list[str], n_answers: int, k: int, codes: int, seed: int,
              prior: float) -> list[int]:
    """One client per user: every sum below is a sum of per-user replies, as the server sums them."""
    mine = [(who == u).nonzero().view(-1) for u in range(len(keys))]
    zero = torch.zeros(len(keys), dtype=torch.long)

    def summed(replies):
        return {key: sum(r[key] for r in replies) for key in replies[0]}

    stats = summed([S.read_stats(inp[i], answers[i], n_answers) for i in mine])
    mean, cents = S.first_centroids(stats, codes, seed)
    unit = [S.unit_centred(inp[i], mean) for i in mine]
    for _ in range(S.KMEANS_ROUNDS):
        cents = S.next_centroids(summed([S.code_stats(x, cents) for x in unit]), cents)
    counts = [S.user_counts(S.nearest(x, cents), answers[i], zero[:len(i)], 1, codes, n_answers)
              for x, i in zip(unit, mine)]
    groups = S.federated_answer_maps([([key], c) for key, c in zip(keys, counts)], k, seed, prior)
    return [int(g[0]) for g in groups]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="lamp2_sample")
    ap.add_argument("--data", required=True, help="a `proper synth` directory (with groups.json)")
    ap.add_argument("--population", required=True, help="population_lora/ of a run, or a population.safetensors")
    ap.add_argument("--k", type=int, required=True, help="groups to cluster into (adapters.k)")
    ap.add_argument("--codes", default="10,15,20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--prior", default=None, help="the answer maps' prior (group.signature_prior), comma-separated "
                    "(default: the config's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    truth = read_groups(cfg.data.path)
    if truth is None:
        raise SystemExit(f"error: {args.data} has no groups.json (make one with `proper synth`)")
    spec, users = load_users(cfg)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    inp, answers, who = readings(cfg, spec, users, Path(args.population), out / "readings.safetensors" if out else None)
    keys = [u.user_id for u in users if u.train]   # the order item_readings numbers `who` in (ClientTrainer.trained)
    true = [truth[u] for u in keys]
    priors = [float(s) for s in (args.prior or str(cfg.group.signature_prior)).split(",")]
    rows = []
    for codes, prior in ((int(c), p) for c in args.codes.split(",") for p in priors):
        row = {"codes": codes, "prior": prior, "centralized": [], "federated": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            row["centralized"].append(adjusted_rand_index(
                centralized(inp, answers, who, len(keys), len(spec.labels), args.k, codes, seed, prior), true))
            row["federated"].append(adjusted_rand_index(
                federated(inp, answers, who, keys, len(spec.labels), args.k, codes, seed, prior), true))
        log.info("codes %d, prior %g: centralized %s, federated %s", codes, prior, row["centralized"],
                 row["federated"])
        rows.append(row)
    seeds = args.seeds.replace(",", " / ")
    lines = [f"{len(keys)} users, {len(inp)} items, k = {args.k}; ARI against groups.json, seeds {seeds}", "",
             "| codes | prior | centralized | mean | federated (one user per client) | mean |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c, f = r["centralized"], r["federated"]
        lines.append(f"| {r['codes']} | {r['prior']:g} | {' / '.join(f'{x:.3f}' for x in c)} | {np.mean(c):.3f} | "
                     f"{' / '.join(f'{x:.3f}' for x in f)} | {np.mean(f):.3f} |")
    text = "\n".join(lines)
    if out:
        atomic_write_text(out / "signature_start.json", json.dumps(rows, indent=1))
        atomic_write_text(out / "signature_start.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
