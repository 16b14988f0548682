"""MTA (Merge-then-Adapt), the other seed system (docs/decisions.md, "MTA"): the algorithms.

  profile embedding  mean-pooled last hidden states of the bare backbone over a user's profile
                     items (prompt + answer, training split only), averaged over the items
  anchor selection   k-means (numpy, seeded, k-means++) of the profile embeddings, after
                     subtracting their mean and L2-normalising (cosine geometry); per cluster the
                     user with the longest history is the anchor
  meta-LoRA bank     one LoRA (r = adapters.r_population, the population slot of ProperModel)
                     per anchor, trained on that anchor's history alone; with the anchors'
                     embeddings and the centre they are measured from
  adaptive fusion    a user's embedding retrieves the top-k (default 2) anchors by cosine
                     similarity (both centred on the bank's centre); weights softmax(sim / T)
                     (default) or the similarities clipped at 0 and normalised ("linear"); the
                     merged LoRA is the exact weighted sum of the anchors' updates,
                     sum_i w_i (alpha/r) B_i A_i, folded into the backbone's weights
  LoRA stacking      a small LoRA (the user slot, r = adapters.r_user) trained on the user's own
                     examples on top of the merged model

Per user, only the stacked LoRA and the retrieved anchors' indices and weights are stored; the
profile embedding is recomputed when needed and never written to disk. Client-side steps are in
client/mta.py, the federated server's in server/mta.py, the privacy reasoning in docs/decisions.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from shared.data.encode import encode_example, make_batches, placed
from shared.runtime.config import stage_cfg
from shared.runtime.precision import autocast


def mta_cfg(cfg: DictConfig) -> DictConfig:
    """The mta section (its keys and defaults: shared/runtime/schema.py, class Mta)."""
    return cfg.mta


def train_cfg(cfg: DictConfig, part: str) -> DictConfig:
    """Training settings of the anchor LoRAs ("anchor") or the stacked LoRAs ("user"): train.*
    overridden by mta.<part>.*"""
    return stage_cfg(cfg, f"mta.{part}")


def default_anchors(n_users: int) -> int:
    return max(1, min(50, n_users, max(2, n_users // 4)))


# ---------------------------------------------------------------- profile embeddings
@torch.no_grad()
def profile_embeddings(model, tokenizer, users, cfg) -> np.ndarray:
    """[U, hidden] per-user profile embeddings from the bare backbone (model in stage "base")."""
    model.set_stage("base")
    items = [encode_example(tokenizer, ex, i, cfg.train.max_len) for i, u in enumerate(users) for ex in u.train]
    hidden = None
    sums = counts = None
    dev = model.device
    for batch in make_batches(items, int(cfg.eval.batch_size), tokenizer.pad_token_id, None):
        ids, mask, _, uidx = placed(batch, dev)
        with autocast(cfg.train, dev.type):
            h = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        m = mask.unsqueeze(-1).float()
        pooled = (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)     # [B, H] mean over tokens
        if hidden is None:
            hidden = pooled.shape[1]
            sums, counts = torch.zeros(len(users), hidden, device=dev), torch.zeros(len(users), device=dev)
        sums.index_add_(0, uidx, pooled)
        counts.index_add_(0, uidx, torch.ones(len(uidx), device=dev))
    if sums is None:
        raise ValueError("no profile items to embed")
    return (sums / counts.clamp_min(1.0).unsqueeze(1)).cpu().numpy().astype(np.float32)  # mean over items


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


# ---------------------------------------------------------------- anchors
def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (labels [N], centroids [k, d]). Deterministic per seed;
    an emptied cluster is re-seeded with the point farthest from its centroid."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    cent = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(cent)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        cent.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    cent = np.asarray(cent)
    labels = np.full(n, -1)
    for _ in range(iters):
        d2 = ((x[:, None, :] - cent[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        for c in range(k):
            if not (new == c).any():
                far = int(d2[np.arange(n), new].argmax())
                new[far] = c
                d2[far] = 0.0
        if (new == labels).all():
            break
        labels = new
        cent = np.stack([x[labels == c].mean(0) for c in range(k)])
    return labels, cent


def select_anchors(emb: np.ndarray, history: list[int] | np.ndarray, n_anchors: int, seed: int = 0,
                   center: bool = True, iters: int = 50) -> tuple[list[int], np.ndarray]:
    """Cluster the embeddings into n_anchors groups; per group the longest history (the first such
    in order) is the anchor. Returns (anchor indices, ordered by cluster; cluster labels)."""
    x = np.asarray(emb, dtype=np.float64)
    if center:
        x = x - x.mean(0, keepdims=True)
    labels, _ = kmeans(_unit(x), n_anchors, seed=seed, iters=iters)
    hist = np.asarray(history)
    anchors = []
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        if len(members):
            anchors.append(int(members[np.argmax(hist[members])]))  # argmax: first of the longest
    return anchors, labels


# ---------------------------------------------------------------- the bank
@dataclass
class Bank:
    loras: list[dict[str, torch.Tensor]]   # per anchor: the population-slot state {layer.lora_A, layer.lora_B}
    embeddings: np.ndarray                 # [A, H] the anchors' profile embeddings
    center: np.ndarray                     # [H] where cosines are measured from (zeros: uncentred)
    history: list[int]                     # the anchors' history lengths

    def __len__(self):
        return len(self.loras)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"anchor{i:03d}/{k}": v for i, lora in enumerate(self.loras) for k, v in lora.items()}
        out["embeddings"] = torch.as_tensor(np.asarray(self.embeddings, np.float32))
        out["center"] = torch.as_tensor(np.asarray(self.center, np.float32))
        out["history"] = torch.as_tensor(np.asarray(self.history, np.int64))
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Bank":
        n = len(t["history"])
        loras = [{} for _ in range(n)]
        for key, v in t.items():
            if key.startswith("anchor"):
                head, _, name = key.partition("/")
                loras[int(head[6:])][name] = v
        return cls(loras, t["embeddings"].float().numpy(), t["center"].float().numpy(),
                   [int(h) for h in t["history"]])

    def save(self, path):
        from shared.runtime.persist import save_tensors
        save_tensors(path, self.to_tensors(), {"format": "proper-mta-bank", "anchors": len(self)})

    @classmethod
    def load(cls, path) -> "Bank":
        from shared.runtime.persist import StateFileError, load_tensors
        t, meta = load_tensors(path)
        if meta.get("format") != "proper-mta-bank":
            raise StateFileError(f"{path}: not an MTA bank (format={meta.get('format')!r})")
        return cls.from_tensors(t)

    def nbytes(self) -> int:
        return int(sum(v.numel() * v.element_size() for v in self.to_tensors().values()))


def build_center(embeddings: np.ndarray, center: bool) -> np.ndarray:
    """The bank's centre: the mean of the anchors' embeddings, which the server holds anyway (no
    other user's embedding is needed to compute it)."""
    e = np.asarray(embeddings, np.float64)
    return (e.mean(0) if center else np.zeros(e.shape[1])).astype(np.float32)


# ---------------------------------------------------------------- retrieval and fusion
def similarities(user_emb: np.ndarray, bank: Bank) -> np.ndarray:
    """Cosine similarity of the user to each anchor, both measured from the bank's centre."""
    u = _unit(np.asarray(user_emb, np.float64) - bank.center)
    a = _unit(np.asarray(bank.embeddings, np.float64) - bank.center)
    return a @ u


def retrieve(user_emb: np.ndarray, bank: Bank, top_k: int = 2, weighting: str = "softmax",
             temperature: float = 0.1) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(indices of the top_k most similar anchors, best first; their fusion weights, summing to 1;
    all similarities)."""
    sims = similarities(user_emb, bank)
    k = max(1, min(top_k, len(sims)))
    idx = [int(i) for i in np.argsort(-sims, kind="stable")[:k]]
    s = sims[idx]
    if weighting == "softmax":
        z = np.exp((s - s.max()) / max(temperature, 1e-8))
        w = z / z.sum()
    elif weighting == "linear":
        c = np.clip(s, 0.0, None)
        w = c / c.sum() if c.sum() > 0 else np.full(k, 1.0 / k)
    else:
        raise ValueError(f"unknown mta.weighting {weighting!r}; expected softmax or linear")
    return idx, w.astype(np.float64), sims


def merged_delta(layer, loras: list[dict[str, torch.Tensor]], weights, name: str) -> torch.Tensor:
    """sum_i w_i (alpha/r) B_i A_i for one layer, in the layout of its base weight."""
    delta = None
    for lora, w in zip(loras, weights):
        d = (lora[f"{name}.lora_B"].float() @ lora[f"{name}.lora_A"].float()) * (layer.scaling * float(w))
        delta = d if delta is None else delta + d
    return delta.T if layer.fan_in_fan_out else delta


@contextmanager
def folded(model, loras: list[dict[str, torch.Tensor]], weights):
    """The backbone with the merged LoRA folded in, W' = W + sum_i w_i (alpha/r) B_i A_i, for the
    duration of the block; the original weights are restored exactly afterwards (copied back, not
    subtracted), so a process can serve many users and other methods with one backbone."""
    if model.merged:
        raise RuntimeError("fold the MTA LoRAs into the bare backbone, not into W_p")
    saved = []
    with torch.no_grad():
        for name, layer in model.layers():
            w = layer.base.weight
            saved.append((layer, w.detach().clone()))
            w += merged_delta(layer, loras, weights, name).to(w.dtype)
            layer.merged = True            # the population slot is not applied on top
    fp, model.population_fingerprint = model.population_fingerprint, None
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, orig in saved:
                layer.base.weight.copy_(orig)
                layer.merged = False
        model.population_fingerprint = fp
