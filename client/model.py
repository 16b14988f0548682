"""The client's model: one backbone with PROPER's adapters per process (shared/runtime/process.py),
whatever number of messages or (simulated) clients the process serves."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from shared.method.model import ProperModel
from shared.runtime.backbone import load_backbone
from shared.runtime.precision import client_device
from shared.runtime.process import PROCESS
from shared.runtime.targets import find_target_modules


def model_key(cfg: DictConfig) -> str:
    """What the model is built from: the backbone, the adapters and the seed that initialises them."""
    if PROCESS.model_of is not None and PROCESS.model_of[0] is cfg:   # the apps' read-only config: once (6 ms)
        return PROCESS.model_of[1]
    key = OmegaConf.to_yaml(OmegaConf.create({"model": cfg.model, "adapters": cfg.adapters, "seed": cfg.seed}))
    PROCESS.model_of = (cfg, key) if OmegaConf.is_readonly(cfg) else None
    return key


def build_model(cfg: DictConfig) -> tuple[ProperModel, object]:
    """A new (ProperModel, tokenizer) for `cfg`, owned by the caller. Built and seeded on the CPU, then
    moved where this process computes (one decision: client_device; under Ray, a client given no GPU
    share sees none)."""
    lm, tok = load_backbone(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)
    targets = find_target_modules(lm, list(cfg.model.targets) if cfg.model.targets else None)
    return ProperModel(lm, targets, seed=cfg.seed, **cfg.adapters).to(client_device()), tok


def get_model(cfg: DictConfig) -> tuple[ProperModel, object]:
    """(ProperModel, tokenizer) for `cfg`: the process's one, built the first time its key is seen; a new
    key replaces the old model (a process holds one backbone)."""
    key = model_key(cfg)
    if PROCESS.model is None or PROCESS.model[0] != key:
        PROCESS.model = None
        PROCESS.model = (key, build_model(cfg))
    return PROCESS.model[1]
