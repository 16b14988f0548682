"""The server's checkpoint: written after every step (round or evaluation), read by --resume.

<run dir>/checkpoint/progress.json           steps done, evaluation results, participation, each
                                             part's key order
<run dir>/checkpoint/state-<n>.safetensors   the shared parts after step n: population LoRA, group
                                             part, the pool of mixtures, each stage's server
                                             optimizer state ("opt.<stage>": moments, momentum),
                                             the signature start's result ("signature": mean,
                                             centroids, log_maps, log_prior)

The tensors are written first under a new name, then progress.json (atomically) points to them,
then older tensor files are removed: a crash at any moment, or a full disk, leaves the last
consistent checkpoint. A corrupt or truncated one is refused on load (StateFileError, naming the
file) before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.runtime.persist import StateFileError, atomic_write_text, load_tensors, save_tensors


class Checkpoint:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "checkpoint"

    def load(self) -> tuple[dict, dict[str, dict | torch.Tensor | None]] | None:
        path = self.dir / "progress.json"
        if not path.exists():
            return None
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError) as e:   # truncated or overwritten: say which file, touch nothing
            raise StateFileError(f"{path}: corrupt checkpoint, not JSON ({e}); nothing was overwritten") from e
        if not isinstance(progress, dict) or not isinstance(progress.get("done"), list):
            raise StateFileError(f"{path}: not a checkpoint of a proper-fl run (no list of steps done)")
        tensors, parts = {}, {"population": None, "group": None, "mixtures": None}
        if progress.get("tensors"):
            tensors, _ = load_tensors(self.dir / progress["tensors"])
        for key, value in tensors.items():
            part, slash, name = key.partition("/")
            if slash:   # a dict of tensors
                parts[part] = parts.get(part) or {}
                parts[part][name] = value
            else:       # one tensor (the pool of mixtures)
                parts[part] = value
        for part, names in progress.get("order", {}).items():
            if isinstance(parts.get(part), dict) and set(names) == set(parts[part]):
                parts[part] = {k: parts[part][k] for k in names}
        return progress, parts

    def save(self, progress: dict, parts: dict):
        self.dir.mkdir(parents=True, exist_ok=True)
        n = len(progress["done"])
        flat = {}
        for part, value in parts.items():
            if isinstance(value, torch.Tensor):
                flat[part] = value
            elif isinstance(value, dict):
                flat.update({f"{part}/{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        name = f"state-{n:04d}.safetensors" if flat else None
        if flat:
            save_tensors(self.dir / name, flat)
        # safetensors reads keys back sorted; a part's own order is kept, because FedAvgM's momentum
        # is a list that follows the order of the arrays it was computed on
        order = {part: list(v) for part, v in parts.items() if isinstance(v, dict)}
        progress = {**progress, "tensors": name, "order": order}
        atomic_write_text(self.dir / "progress.json", json.dumps(progress, indent=1))
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
