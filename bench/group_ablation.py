"""Group-stage ablations in one process: does the group stage find the users' groups?

    python -m bench.group_ablation -c lamp2_sample --data <proper synth dir> --out <dir> \
        --variant base= --variant init0.5=adapters.router_u_init=0.5 ...

The population stage is trained once (centralized, as `proper local` trains it) and cached in
<out>/population.safetensors; every variant then runs the group stage's rounds from that same
population LoRA through the same ClientTrainer calls as `proper local`, so a variant here is the
group stage of the `proper local` run with that override. Per variant it records the group
recovery (ARI, purity of each user's dominant expert against the data's groups.json), how peaked
the users' mixtures are (mean weight of the dominant expert; 1/k is uniform), the same read layer
by layer and by k-means over the users' per-layer mixtures (each layer's router numbers its experts
its own way: groups.py layer_recovery), the group stage's
val (and test) score and the training losses; a table goes to <out>/group_ablation.md and .json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.trainer import ClientTrainer, load_users
from shared.data.encode import encode_users, make_batches
from shared.evaluation.groups import (
    MIXTURES_FILE,
    adjusted_rand_index,
    group_recovery,
    layer_recovery,
    read_groups,
    read_user_mixtures,
)
from shared.evaluation.metrics import stats_metrics
from shared.method.mta import kmeans
from shared.method.stages import mixtures_by_user
from shared.runtime.config import load_config, stage_cfg
from shared.runtime.persist import atomic_write_text, load_tensors, save_tensors

log = logging.getLogger("bench.group_ablation")


def population_state(cfg, spec, users, out: Path) -> dict:
    """The centralized population LoRA for this config and data, trained once and cached."""
    path = out / "population.safetensors"
    if path.exists():
        return load_tensors(path)[0]
    with tempfile.TemporaryDirectory() as state:
        client = ClientTrainer(cfg, spec, users, state)
        pop = client.population(None, 1).shared
    save_tensors(path, pop)
    return pop


def history_embeddings(client, pop: dict, d: int, seed: int) -> torch.Tensor:
    """A data-derived start for every user's e_u (an experiment of this bench, not a config option):
    the population model's last hidden state at the user's answer tokens, averaged over its history,
    centred over the users, projected to d dims by a seeded Gaussian matrix and scaled to the norm of
    the usual N(0, I) start. Users who answer alike start close. Centring uses every user's mean:
    a federation would need a shared reference instead (a public prompt set, or a DP mean)."""
    client.prepare("group", pop)
    model, tok = client.model, client.tokenizer
    model.set_stage("population")   # merged: W_p alone, the population model
    users = list(getattr(client, "trained", client.users))
    sums = torch.zeros(len(users), model.lm.config.hidden_size)
    counts = torch.zeros(len(users))
    with torch.no_grad():
        for ids, mask, labels, uidx in make_batches(encode_users(tok, users, client.cfg.train.max_len),
                                                    8, tok.pad_token_id, None):
            hidden = model.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            keep = (labels != -100).float().unsqueeze(-1)
            sums.index_add_(0, uidx, (hidden * keep).sum(1))
            counts.index_add_(0, uidx, keep.sum((1, 2)))
    means = sums / counts.clamp(min=1).view(-1, 1)
    means = means - means.mean(0)
    proj = torch.randn(means.shape[1], d, generator=torch.Generator().manual_seed(seed)) / means.shape[1] ** 0.5
    e = means @ proj
    return e / e.norm(dim=1, keepdim=True).clamp(min=1e-8) * d ** 0.5


def update_signatures(client, pop: dict) -> torch.Tensor:
    """[U, P] each user's gradient of its mean answer loss over its history, with respect to the
    population LoRA at its final value (pop), in `client.trained` order: the direction one more
    population step on that user alone would move the LoRA. A one-user client's population update
    is this, to first order (minus lr times it), and without secure aggregation or DP the server
    already receives it; a client of several users never sends a per-user gradient, so there this
    would be new traffic. Clustering clients by their updates is Clustered FL's signal (Sattler et
    al. 2020). An experiment of this bench (start=updates), centralized."""
    from shared.method.stages import answer_loss
    from shared.runtime.precision import autocast
    client.prepare("population", pop)
    model, tok = client.model, client.tokenizer
    model.set_stage("population", train=True)
    params = model.trainable_parameters()
    pcfg = stage_cfg(client.cfg, "population")
    sigs = []
    for u in getattr(client, "trained", client.users):
        for p in params:
            p.grad = None
        items = encode_users(tok, [u], client.cfg.train.max_len)
        for ids, mask, labels, _ in make_batches(items, 8, tok.pad_token_id, None):
            with autocast(pcfg):
                loss = answer_loss(model.lm, ids, mask, labels) * (len(ids) / len(items))
            loss.backward()
        sigs.append(torch.cat([p.grad.flatten().float() for p in params]))
    model.set_stage("population")
    for p in params:
        p.grad = None
    return torch.stack(sigs)


def cluster_signatures(sigs: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """k-means (k-means++ seeded) of the users' signatures by direction: unit rows, centred over the
    users (what every user shares is the population's own residual, not a group), reduced to their
    top-k principal components (the Gram matrix's eigenvectors: U is small, P is large)."""
    x = torch.nn.functional.normalize(sigs.double(), dim=1)
    x = x - x.mean(0)
    gram = x @ x.T
    vals, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -k:] * vals[-k:].clamp_min(0).sqrt()
    labels, _ = kmeans(top.numpy(), k, seed=seed)
    return labels


def run_variant(cfg, spec, users, pop: dict, groups: dict, splits: list[str], start: str = "random",
                every_round: bool = False) -> dict:
    """The group stage's rounds from `pop`, then recovery, peakedness and scores. start="history":
    the users' e_u start from history_embeddings instead of the seeded N(0, I). start="truth": each
    user starts on its true group's expert (groups.json), which group.reassign=false keeps: what the
    group stage learns once the grouping is perfect. every_round: the first split is also scored after
    every group round (a learning curve: does the group stage overfit its items?)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as state:
        client = ClientTrainer(cfg, spec, users, state)
        start_ari = None
        if start == "updates":
            k = int(cfg.adapters.k)
            clusters = cluster_signatures(update_signatures(client, pop), k, int(cfg.seed))
            trained = getattr(client, "trained", client.users)
            client.assign_start = {u.user_id: int(c) for u, c in zip(trained, clusters)}
            known = [(int(c), groups[u.user_id]) for u, c in zip(trained, clusters) if u.user_id in groups]
            start_ari = adjusted_rand_index([c for c, _ in known], [g for _, g in known])
            log.info("start=updates: clusters of the users' population updates, ARI %.3f against the groups",
                     start_ari)
        if start == "truth":   # the grouping's ceiling: every user kept on its true group's expert
            trained = getattr(client, "trained", client.users)
            if int(cfg.adapters.k) < 1 + max(groups.values()):
                raise SystemExit(f"start=truth needs adapters.k >= {1 + max(groups.values())} (the data's groups)")
            client.assign_start = {u.user_id: int(groups[u.user_id]) for u in trained}
            start_ari = 1.0
        if start == "history":
            emb = history_embeddings(client, pop, int(cfg.adapters.d_user), int(cfg.seed))
            for u, e in zip(getattr(client, "trained", client.users), emb):
                client.store.save(u.user_id, "embedding", {"e_u": e.clone(), "e_u_before": e.clone(),
                                                           "round": torch.tensor([0])})
        group = others = None
        losses, assigned, curve = [], [], []
        for rnd in range(1, int(cfg.group.rounds) + 1):
            with _recording_assignments() as record:
                res = client.group(pop, group, others, rnd)
            if record:  # constraint_form=assign: how this round's assignment matches the groups
                trained = getattr(client, "trained", client.users)
                known = [(int(e), groups[u.user_id]) for u, e in zip(trained, record[-1]) if u.user_id in groups]
                assigned.append(adjusted_rand_index([e for e, _ in known], [g for _, g in known]))
                log.info("group round %d: assignment ARI %.3f", rnd, assigned[-1])
            group, others = res.shared, res.mixtures
            losses.append((res.metrics["train_loss"], res.metrics["constraint_loss"]))
            if every_round and rnd < int(cfg.group.rounds):
                r = client.evaluate("group", pop, group, split=splits[0])
                curve.append(stats_metrics(spec, r.stats)[spec.metrics[0]])
                log.info("group round %d: %s %.3f, train loss %.3f", rnd, splits[0], curve[-1], losses[-1][0])
        mixtures = read_user_mixtures(Path(state) / MIXTURES_FILE)
        layered = _layered(client, cfg, groups)
        scores, breakdown = {}, {}
        for split in splits:
            r = client.evaluate("group", pop, group, split=split)
            scores[split] = stats_metrics(spec, r.stats)[spec.metrics[0]]
            preds = client.predictions("group", pop, group, split, None)
            breakdown[split] = error_breakdown(users, groups, preds, split)
    rec = group_recovery({u: m["expert"] for u, m in mixtures.items()}, groups)
    peak = float(np.mean([max(m["mixture"]) for m in mixtures.values()]))
    plot = {u: m["mixture"] for u, m in mixtures.items()}
    return {**rec, **layered, "dominant_weight": peak, "scores": scores, "train_loss": losses[-1][0], "_mixtures": plot,
            "constraint_loss": losses[-1][1], "seconds": time.time() - t0, "start_ari": start_ari,
            "assignment_ari": assigned, "breakdown": breakdown,
            "by_round": curve + [scores[splits[0]]] if every_round else None,
            "loss_by_round": [a for a, _ in losses]}


@contextlib.contextmanager
def _recording_assignments():
    """Record what client.group's assign_experts returns while the block runs (the bench reads the
    assignment's own ARI per round; the trainer itself is unchanged)."""
    import client.group as trainer
    real, record = trainer.assign_experts, []

    def recorded(*args, **kwargs):
        record.append(real(*args, **kwargs))
        return record[-1]

    trainer.assign_experts = recorded
    try:
        yield record
    finally:
        trainer.assign_experts = real


def _layered(client, cfg, groups: dict) -> dict:
    """Recovery from each user's per-layer mixtures under the final group part: per layer
    (shared/evaluation/groups.py layer_recovery) and by k-means over the flattened [L x k]
    mixtures (k = adapters.k clusters, as many as experts: no knowledge of the true count)."""
    users = [u for u in getattr(client, "trained", client.users) if u.user_id in groups]
    emb = torch.stack([client.user_embedding(u) for u in users])
    by_user, _ = mixtures_by_user(client.model, client.tokenizer, users, emb, stage_cfg(cfg, "group"))
    true = [groups[u.user_id] for u in users]
    clusters, _ = kmeans(by_user.flatten(1).numpy(), int(cfg.adapters.k), seed=int(cfg.seed))
    return {**layer_recovery(by_user.numpy(), true), "ari_kmeans": adjusted_rand_index(clusters, true)}


def plot_by_group(mixtures: dict[str, list[float]], groups: dict, title: str, path: Path):
    """Heatmap of the users' mixtures (layer-averaged), rows sorted by their true group (lines
    between groups), then by dominant expert: recovered groups show as blocks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    users = sorted((u for u in mixtures if u in groups),
                   key=lambda u: (groups[u], int(np.argmax(mixtures[u])), -max(mixtures[u])))
    m = np.array([mixtures[u] for u in users])
    fig, ax = plt.subplots(figsize=(4, max(3, 0.04 * len(m) + 1.5)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    bounds = [i for i in range(1, len(users)) if groups[users[i]] != groups[users[i - 1]]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=1.2)
    ax.set_xlabel("expert")
    ax.set_ylabel("user, sorted by true group")
    ax.set_xticks(range(m.shape[1]))
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def group_oracle(users, groups: dict, split: str) -> float | None:
    """The ceiling a grouping can reach on synthetic LaMP_2 users: knowing every user's true group
    and reading every item's theme (shared/data/synthetic.py theme_of), answer a query with the tag
    the user's group gave that theme most often in its members' training items (the group's
    map as the data show it; quirks and noise included). None where the themes cannot be read."""
    from collections import Counter

    from shared.data.synthetic import theme_of
    votes: dict[tuple[int, str], Counter] = {}
    for u in users:
        for x in u.train:
            th = theme_of(x.input.rpartition("description:")[2])
            if u.user_id in groups and th is not None:
                votes.setdefault((groups[u.user_id], th), Counter())[x.output] += 1
    asked = [(groups[u.user_id], theme_of(x.input.rpartition("description:")[2]), x.output)
             for u in users if u.user_id in groups for x in getattr(u, split)]
    if not votes or not asked:
        return None
    right = sum(1 for g, th, out in asked if (g, th) in votes and votes[(g, th)].most_common(1)[0][0] == out)
    return right / len(asked)


def error_breakdown(users, groups: dict, preds: dict[str, list[str]], split: str) -> dict | None:
    """Where the group stage's `split` answers go wrong (synthetic LaMP_2 users, themes readable):
    accuracy on the items the group oracle answers right and on those it cannot (the user's quirks,
    or a group majority the data got wrong), by the user's history size; and how often the answer is
    the group oracle's tag, or the tag every group together gives the theme most (what the population
    stage learns). An accuracy far under the oracle on its right items with answers at the all-groups
    tag says the experts have not moved the population's map to their group's."""
    from collections import Counter

    from shared.data.synthetic import theme_of
    theme = lambda x: theme_of(x.input.rpartition("description:")[2])  # noqa: E731
    by_group: dict[tuple[int, str], Counter] = {}
    overall: dict[str, Counter] = {}
    for u in users:
        for x in u.train:
            th = theme(x)
            if u.user_id in groups and th is not None:
                by_group.setdefault((groups[u.user_id], th), Counter())[x.output] += 1
                overall.setdefault(th, Counter())[x.output] += 1
    rows = []
    for u in users:
        if u.user_id not in groups or u.user_id not in preds:
            continue
        for x, p in zip(getattr(u, split), preds[u.user_id]):
            th = theme(x)
            if th is None or (groups[u.user_id], th) not in by_group:
                continue
            tag = by_group[(groups[u.user_id], th)].most_common(1)[0][0]
            rows.append({"size": len(u.train), "right": p.strip() == x.output, "oracle_right": tag == x.output,
                         "at_oracle": p.strip() == tag, "at_overall": p.strip() == overall[th].most_common(1)[0][0],
                         "group_is_overall": tag == overall[th].most_common(1)[0][0]})
    if not rows:
        return None
    mean = lambda rs, key: round(float(np.mean([r[key] for r in rs])), 3) if rs else None  # noqa: E731
    out = {"items": len(rows), "accuracy": mean(rows, "right"), "at_oracle": mean(rows, "at_oracle"),
           "at_overall": mean(rows, "at_overall")}
    right = [r for r in rows if r["oracle_right"]]
    out["on_oracle_right"] = mean(right, "right")
    out["on_oracle_wrong"] = mean([r for r in rows if not r["oracle_right"]], "right")
    out["on_oracle_right_group_differs"] = mean([r for r in right if not r["group_is_overall"]], "right")
    out["on_oracle_right_group_same"] = mean([r for r in right if r["group_is_overall"]], "right")
    for lo, hi in ((0, 4), (5, 10), (11, 10**9)):
        part = [r for r in right if lo <= r["size"] <= hi]
        out[f"on_oracle_right_size_{lo}-{hi if hi < 10**9 else 'up'}"] = [mean(part, "right"), len(part)]
    return out


def table(rows: list[dict], k: int, splits: list[str]) -> str:
    head = ["variant", "ARI", "ARI per layer (mean / max)", "ARI k-means", "purity", "experts used",
            f"dominant weight: layer-averaged / per layer (1/k = {1 / k:.2f})",
            *[f"group {s}" for s in splits], "loss", "constraint", "start ARI", "assignment ARI by round",
            f"group {splits[0]} by round", "loss by round", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['ari']:.3f}", f"{r['ari_layer_mean']:.3f} / {r['ari_layer_max']:.3f}",
                 f"{r['ari_kmeans']:.3f}", f"{r['purity']:.3f}", str(r["experts_used"]),
                 f"{r['dominant_weight']:.3f} / {r['peak_layer']:.3f}",
                 *[f"{100 * r['scores'][s]:.1f}" for s in splits],
                 f"{r['train_loss']:.3f}", f"{r['constraint_loss']:.3f}",
                 "" if r.get("start_ari") is None else f"{r['start_ari']:.3f}",
                 " / ".join(f"{a:.2f}" for a in r.get("assignment_ari", [])),
                 " / ".join(f"{100 * a:.1f}" for a in r.get("by_round") or []),
                 " / ".join(f"{a:.3f}" for a in r.get("loss_by_round", [])), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="lamp2_sample")
    ap.add_argument("--data", required=True, help="a `proper synth` directory (with groups.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", default=[],
                    help="name=override[,override...] (empty after '=' for the config as it is); "
                         "start=history: e_u start from the users' histories (history_embeddings); "
                         "start=truth: users kept on their true group's expert (with group.reassign=false)")
    ap.add_argument("--splits", default="val")
    ap.add_argument("--every-round", action="store_true",
                    help="score the first split after every group round too (a learning curve)")
    ap.add_argument("overrides", nargs="*", help="key=value for every variant")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"data.path={args.data}", *args.overrides]
    cfg = load_config(args.config, base)
    groups = read_groups(cfg.data.path)
    if groups is None:
        raise SystemExit(f"error: {args.data} has no groups.json (make one with `proper synth`)")
    spec, users = load_users(cfg)
    pop = population_state(cfg, spec, users, out)
    splits = args.splits.split(",")
    oracle = {s: group_oracle(users, groups, s) for s in splits}
    ceiling = "".join(f"\nGroup oracle ({s}): {100 * v:.1f}\n" for s, v in oracle.items() if v is not None)
    rows = []
    for v in args.variant or ["base="]:
        name, _, extra = v.partition("=")
        opts = [o for o in extra.split(",") if o]
        start = next((o.partition("=")[2] for o in opts if o.startswith("start=")), "random")
        vcfg = load_config(args.config, base + [o for o in opts if not o.startswith("start=")])
        log.info("variant %s: %s", name, extra or "(config as is)")
        row = run_variant(vcfg, spec, users, pop, groups, splits, start, args.every_round)
        plot_by_group(row.pop("_mixtures"), groups, f"{name}: ARI {row['ari']:.3f}", out / f"mixtures_{name}.png")
        rows.append({"variant": name, "overrides": extra, **row})
        log.info("variant %s: ARI %.3f, dominant weight %.3f, scores %s", name, rows[-1]["ari"],
                 rows[-1]["dominant_weight"], rows[-1]["scores"])
        atomic_write_text(out / "group_ablation.json", json.dumps(rows, indent=1))
        atomic_write_text(out / "group_ablation.md", table(rows, int(cfg.adapters.k), splits) + ceiling)
    print(table(rows, int(cfg.adapters.k), splits) + ceiling)


if __name__ == "__main__":
    main()
