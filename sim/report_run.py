"""One run directory as `proper report` reads it (sim/report.py): its config and table, and what
its users cost: the bytes of private state each user keeps on its client (UserStore files) and the
bytes a client uploads per training round (the wire audit, else computed from the shapes of the
shared parameters in the run's checkpoint or artifacts).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

METHOD_TITLES = {"proper": "PROPER", "population": "population LoRA (FedAvg)", "oppu": "OPPU-style",
                 "loramoe": "LoRAMoE", "mta": "MTA"}
# private files per user that a model at this stage needs (UserStore kinds)
STORED_KINDS = {"base": set(), "population": set(), "group": {"embedding"}, "user": {"embedding", "user", "router"},
                "mta_merge": {"mta"}, "mta": {"mta", "mta_user"}}
# the replies of the training rounds a model at this stage has been through (message types)
SENT_TYPES = {"base": set(), "population": {"train.population"},
              "group": {"train.population", "train.group", "query.mixtures"},
              "user": {"train.population", "train.group", "query.mixtures", "train.user"},
              "mta_merge": {"query.mta_candidates", "train.mta_anchor"},
              "mta": {"query.mta_candidates", "train.mta_anchor", "train.mta_user"}}
# the rounds.jsonl training stages that send those replies
STAGE_OF_TYPE = {"train.population": "population", "train.group": "group", "query.mixtures": "group",
                 "train.user": "user",
                 "query.mta_candidates": "mta_bank", "train.mta_anchor": "mta_bank", "train.mta_user": "mta_user"}
def _eps(value) -> str:
    return f"{value:.3g}" if value != float("inf") else "inf"


USER_FILE = re.compile(r"^(?P<user>.+-[0-9a-f]{8})\.(?P<kind>[^.]+)")


class Run:
    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        if not (self.path / "table.json").is_file():
            raise FileNotFoundError(f"{self.path}: no table.json; not a finished run directory")
        config = self.path / "config.yaml"
        self.cfg = OmegaConf.load(config) if config.exists() else OmegaConf.create({})
        self.rows = json.loads((self.path / "table.json").read_text())
        # a run directory of any version, or without config.yaml: not checked against the schema
        self.method = str(self.cfg.get("method", "proper"))
        self.federated = (self.path / "checkpoint").is_dir() or (self.path / "clients").is_dir()
        where = "federated" if self.federated else "centralized"
        self.label = label or f"{METHOD_TITLES.get(self.method, self.method)} ({where})"

    def records(self) -> list[dict]:
        p = self.path / "rounds.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    # ---- privacy (server/privacy.py writes the record; runs made before it have none)
    def privacy(self) -> str:
        rec = next((r for r in reversed(self.records()) if r.get("kind") == "privacy"), None)
        if rec is None or not rec.get("dp"):   # centralized runs, and runs made before privacy.dp, had none
            return "no formal DP"
        stages = ", ".join(f"{_eps(s['epsilon'])} ({name})" for name, s in rec.get("stages", {}).items())
        return f"DP: epsilon {stages}; composed {_eps(rec['epsilon'])} at delta {rec['delta']:.3g}"

    # ---- wall time
    def wall_seconds(self) -> float | None:
        md = self.path / "table.md"
        if md.exists():
            m = re.search(r"wall time (\d+(?:\.\d+)?) s", md.read_text())
            if m:
                return float(m.group(1))
        start, end = self.path / "config.yaml", self.path / "table.json"
        if start.exists():
            return end.stat().st_mtime - start.stat().st_mtime
        return None

    # ---- bytes stored per user
    def state_dirs(self) -> list[Path]:
        dirs = [self.path / "client_state"] if (self.path / "client_state").is_dir() else []
        if (self.path / "clients").is_dir():
            dirs += [d for d in sorted((self.path / "clients").iterdir()) if d.is_dir()]
        return dirs

    def stored_per_user(self, stage: str | None = None) -> tuple[float | None, dict[str, int]]:
        """(mean bytes over users, {kind: mean bytes}) of the users' private files that a model at
        `stage` needs (all of them when stage is None)."""
        kinds = STORED_KINDS.get(stage) if stage else None
        per_user: dict[str, int] = {}
        per_kind: dict[str, int] = {}
        for d in self.state_dirs():
            for entry in d.iterdir():
                m = USER_FILE.match(entry.name)
                if not m:
                    continue  # client-level files (e.g. the mixtures it last sent), not a user's
                key = f"{d.name}/{m.group('user')}"
                per_user.setdefault(key, 0)
                if kinds is not None and m.group("kind") not in kinds:
                    continue
                size = _size(entry)
                per_user[key] += size
                per_kind[m.group("kind")] = per_kind.get(m.group("kind"), 0) + size
        if not per_user:
            return None, {}
        n = len(per_user)
        return float(np.mean(list(per_user.values()))), {k: v / n for k, v in per_kind.items()}

    # ---- bytes sent per client per round
    def sent_per_round(self, stage: str | None = None) -> tuple[float | None, float | None, str]:
        """(mean, max, source) of the bytes one client uploads in one training round, over the
        rounds a model at `stage` went through (all training rounds when stage is None)."""
        types = SENT_TYPES.get(stage) if stage else None
        wire = sorted((self.path / "wire").glob("*.jsonl")) if (self.path / "wire").is_dir() else []
        sizes = []
        for f in wire:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                mt = str(r.get("message_type", ""))
                if mt.split(".")[0] in ("train", "query") and not r.get("error") and (types is None or mt in types):
                    sizes.append(int(r.get("bytes", 0)))
        if sizes:
            return float(np.mean(sizes)), float(max(sizes)), "audit"
        if wire:
            return None, None, ""
        stages = None if types is None else {STAGE_OF_TYPE[t] for t in types}
        sizes = [n for st, n in self._computed_uploads() if stages is None or st in stages]
        if sizes:
            return float(np.mean(sizes)), float(max(sizes)), "computed"
        return None, None, ""

    def _computed_uploads(self) -> list[tuple[str, int]]:
        """One (training stage, bytes) per (client, training round): what its reply would carry,
        from the shapes of the shared parameters this run produced."""
        pop, group = self._shared_parts()
        per_client = int(OmegaConf.select(self.cfg, "federation.users_per_client", default=1) or 1)
        users = max((r.get("users", 0) for r in self.rows), default=0) or 1
        clients = max(1, -(-users // per_client))
        out: list[tuple[str, int]] = []
        for rec in self.records():
            if rec.get("kind") != "train":
                continue
            stage = rec.get("stage")
            if stage == "population" and pop:
                out += [(stage, pop)] * clients
            elif stage == "group" and group:
                n_layers, k = self._layers_k()
                out += [(stage, group + 4 * n_layers * k * (1 + per_client))] * clients  # + routing mass, mixtures
            elif stage in ("user", "mta_user"):
                out += [(stage, 0)] * clients
            elif stage == "mta_bank":
                bank = self.path / "mta_bank.safetensors"
                if bank.exists():
                    from shared.method.mta import Bank
                    b = Bank.load(bank)
                    cand = int(OmegaConf.select(self.cfg, "mta.candidates_per_client", default=1) or 1)
                    out += [(stage, cand * (4 * b.embeddings.shape[1] + 8))] * clients
                    lora = int(sum(v.numel() * 4 for v in b.loras[0].values())) if len(b) else 0
                    out += [(stage, lora)] * len(b)
        return out

    def _shared_parts(self) -> tuple[int, int]:
        """float32 bytes of the population LoRA and of the group part: from the federated server's
        last checkpoint, else from the artifacts `proper local` exports."""
        from safetensors import safe_open
        sizes = {"population": 0, "group": 0}
        ckpts = self._checkpoints()
        if ckpts:
            files = [(ckpts[-1], None)]
        else:
            files = [(self.path / "population_lora" / "adapter_model.safetensors", "population"),
                     (self.path / "group.safetensors", "group")]
        for path, part in files:
            if not path.exists():
                continue
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    which = part or key.partition("/")[0]
                    if which in sizes:
                        sizes[which] += int(np.prod(f.get_slice(key).get_shape())) * 4
        return sizes["population"], sizes["group"]

    def _checkpoints(self) -> list[Path]:
        """The federated run's checkpoint files, oldest first ([] for a local run)."""
        d = self.path / "checkpoint"
        return sorted(d.glob("state-*.safetensors")) if d.is_dir() else []

    def _layers_k(self) -> tuple[int, int]:
        """(layers with experts, k), for the routing mass and mixtures a group reply carries."""
        from safetensors import safe_open
        k = int(OmegaConf.select(self.cfg, "adapters.k", default=5) or 5)
        ckpts = self._checkpoints()
        for path in [*ckpts[-1:], self.path / "group.safetensors"]:
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    n = sum(1 for key in f.keys() if key.endswith(".expert_A"))
                if n:
                    return n, k
        return 0, k


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

