"""Group recovery: do the experts a user routes to match the latent groups the data was drawn from?

Only for data with known groups (synthetic users, shared/data/synthetic.py, whose groups.json
maps each user to its group). A user's dominant expert is the argmax of its routing mixture p_u
averaged over layers; the partition of users by dominant expert is compared with the true one by

  adjusted Rand index  agreement on pairs of users (same / different cluster), corrected for
                       chance: 1 = the same partition up to relabelling, ~0 = no better than random
  purity               share of users whose expert's majority group is their own group

Each client writes its users' mixtures to its own state directory (<state dir>/mixtures.csv,
written by ClientTrainer.group). The file names users, so it never leaves the client; in a
simulation every client writes to the same disk, so after the run run_group_recovery reads them
all back as an analysis.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

MIXTURES_FILE = "mixtures.csv"


# ---------------------------------------------------------------- partitions
def contingency(a, b) -> np.ndarray:
    """[classes of a, classes of b] counts of items labelled (a_i, b_j); labels may be any values."""
    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    if len(ia) != len(ib):
        raise ValueError(f"{len(ia)} labels against {len(ib)}")
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def _pairs(counts) -> int:
    # Python ints: exact, where int64 products of pair counts could overflow for large populations
    return sum(int(c) * (int(c) - 1) // 2 for c in np.ravel(counts))


def adjusted_rand_index(a, b) -> float:
    """Hubert and Arabie's adjusted Rand index of two labellings of the same items (symmetric).

    ARI = (index - expected) / (max - expected), with index = pairs together in both, expected =
    pairs(a) * pairs(b) / pairs(n) and max = (pairs(a) + pairs(b)) / 2. Scaled by pairs(n) to keep
    it in integers. NaN for no items.
    """
    table = contingency(a, b)
    n = int(table.sum())
    if n == 0:
        return float("nan")
    total, index = n * (n - 1) // 2, _pairs(table)
    pa, pb = _pairs(table.sum(1)), _pairs(table.sum(0))
    num = 2 * (index * total - pa * pb)
    den = (pa + pb) * total - 2 * pa * pb
    # den is 0 only when both labellings put everything together or everything apart: the same
    # partition, which scores 1 (as sklearn's adjusted_rand_score does)
    return 1.0 if den == 0 else num / den


def purity(clusters, classes) -> float:
    """Share of items whose cluster's most common class is their class. NaN for no items."""
    table = contingency(clusters, classes)
    n = int(table.sum())
    return float(table.max(1).sum() / n) if n else float("nan")


# ---------------------------------------------------------------- users' mixtures on a client's disk
def dominant_experts(mixtures) -> np.ndarray:
    """[U] the expert each user routes to most, from [U, L, k] mixtures averaged over layers."""
    return np.asarray(mixtures, dtype=np.float64).mean(1).argmax(1)


def write_user_mixtures(state_dir, user_ids: list[str], mixtures, server_round: int) -> Path:
    """<state dir>/mixtures.csv: user, round, dominant expert, mixture averaged over layers.

    mixtures: [U, L, k] in user_ids order; a NaN row (a user that had no tokens) is left out.
    Private: it names users, so it stays on the client that wrote it.
    """
    from shared.runtime.persist import atomic_write_text  # here: readers of the file need no torch
    mean = np.asarray(mixtures, dtype=np.float64).mean(1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["user", "round", "expert", *[f"p{e}" for e in range(mean.shape[1])]])
    for uid, p in zip(user_ids, mean):
        if np.isfinite(p).all():
            w.writerow([uid, server_round, int(p.argmax()), *[f"{x:.6f}" for x in p]])
    path = Path(state_dir) / MIXTURES_FILE
    atomic_write_text(path, buf.getvalue())
    return path


def read_user_mixtures(path) -> dict[str, dict]:
    """user -> {"round", "expert", "mixture"} from one client's mixtures.csv."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            mixture = [float(v) for k, v in row.items() if k.startswith("p")]
            out[row["user"]] = {"round": int(row["round"]), "expert": int(row["expert"]), "mixture": mixture}
    return out


def read_groups(data_path) -> dict[str, int] | None:
    """user -> true group from <data dir>/groups.json, or None where the data has no known groups."""
    p = Path(data_path)
    path = (p if p.is_dir() else p.parent) / "groups.json"
    if not path.is_file():
        return None
    return {str(u): int(g) for u, g in json.loads(path.read_text(encoding="utf-8"))["users"].items()}


# ---------------------------------------------------------------- the measure
def group_recovery(experts: dict[str, int], groups: dict[str, int]) -> dict[str, float]:
    """ARI and purity of the users' dominant experts against their true groups (users in both)."""
    users = sorted(set(experts) & set(groups))
    pred = [experts[u] for u in users]
    true = [groups[u] for u in users]
    return {"ari": adjusted_rand_index(pred, true), "purity": purity(pred, true), "users": len(users),
            "experts_used": len(set(pred))}


def recovery_note(rec: dict) -> str:
    """The results table's line for a run's group recovery."""
    return (f"group recovery after group round {rec['round']}: adjusted Rand index {rec['ari']:.3f}, "
            f"purity {rec['purity']:.3f} of the users' dominant experts against the data's known groups "
            f"({rec['users']} users, {rec['experts_used']} experts used; shared/evaluation/groups.py)")


def layer_recovery(mixtures, true) -> dict[str, float]:
    """Group recovery read layer by layer, from [U, L, k] mixtures and the users' true groups [U].

    Each layer has its own router, so "expert 2" of one layer and of another are unrelated: a user
    whose every layer routes decisively, but to differently numbered experts, has a near-uniform
    layer-averaged mixture and an arbitrary dominant expert. Per layer, the dominant expert is well
    defined: ari_layer_mean / ari_layer_max are the ARI of those per-layer assignments; peak_layer
    is the mean, over users and layers, of the dominant expert's weight (1/k is uniform)."""
    m = np.asarray(mixtures, dtype=np.float64)
    aris = [adjusted_rand_index(m[:, layer].argmax(1), true) for layer in range(m.shape[1])]
    return {"ari_layer_mean": float(np.mean(aris)), "ari_layer_max": float(np.max(aris)),
            "peak_layer": float(m.max(2).mean())}


def state_dirs(run_dir) -> list[Path]:
    """The clients' state directories of a run: client_state/ (proper local), clients/*/ (proper sim)."""
    run = Path(run_dir)
    dirs = [run / "client_state"] if (run / "client_state").is_dir() else []
    if (run / "clients").is_dir():
        dirs += sorted(d for d in (run / "clients").iterdir() if d.is_dir())
    return dirs


def run_group_recovery(run_dir, data_path=None) -> dict | None:
    """Group recovery of a finished run from its clients' mixture files and the data's groups.json.

    data_path: the data directory (default: data.path of <run dir>/config.yaml). None when the data
    has no groups.json or no client wrote mixtures (no group stage). A client holds the mixtures of
    the last group round it trained in; "round" is the latest of those.
    """
    if data_path is None:
        from omegaconf import OmegaConf
        data_path = OmegaConf.load(Path(run_dir) / "config.yaml").data.path
    groups = read_groups(data_path)
    files = [d / MIXTURES_FILE for d in state_dirs(run_dir) if (d / MIXTURES_FILE).is_file()]
    if groups is None or not files:
        return None
    rows = {u: r for f in files for u, r in read_user_mixtures(f).items()}
    result = group_recovery({u: r["expert"] for u, r in rows.items()}, groups)
    return {**result, "round": max(r["round"] for r in rows.values())}
