"""Configuration: omegaconf YAML under configs/, overridden by `key=value` pairs.

`load_config("configs/lamp2_sample.yaml", ["group.rounds=3"])` merges, in order: the defaults
(configs/default.yaml), the named file, then the overrides. Relative data paths are resolved
against the working directory first, then against the repository root, so the same config works
from a clone and from an installed copy.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]   # shared/runtime/config.py -> the repository
CONFIG_DIR = ROOT / "configs"


class ConfigError(ValueError):
    pass


def check(cfg: DictConfig) -> DictConfig:
    """Refuse values the run would only trip over later, naming the key."""
    bf16 = cfg.train.get("bf16", "auto")
    if not (isinstance(bf16, bool) or str(bf16).lower() == "auto"):
        raise ConfigError(f"train.bf16: expected true, false or auto, got {bf16!r}")
    if "schedule" in cfg.federation:
        raise ConfigError("federation.schedule is gone: federation.chains=1 is the sequential schedule, "
                          "null (one chain per client) the parallel one")
    return cfg


def resolve_config_path(name: str | Path) -> Path:
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config {name!r} not found (looked in . and {CONFIG_DIR})")


def load_config(name: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    cfg = OmegaConf.load(CONFIG_DIR / "default.yaml")
    if name:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_config_path(name)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    cfg.data.path = str(resolve_data_path(cfg.data.path))
    return check(cfg)


def resolve_data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    cand = (ROOT / p)
    return cand.resolve() if cand.exists() else p


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
