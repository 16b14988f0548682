"""Configuration: omegaconf YAML under configs/, overridden by `key=value` pairs, checked against
the schema (shared/runtime/schema.py: every key, its default, the values it accepts).

`load_config("configs/lamp2_sample.yaml", ["group.rounds=3"])` merges, in order: the schema's
defaults (configs/default.yaml lists the same), the named file, then the overrides. An unknown key
or a refused value raises ConfigError, naming the key and the file or override it came from.
Relative data paths are resolved against the working directory first, then against the repository
root, so the same config works from a clone and from an installed copy.

The result is a plain DictConfig holding every key (stage overrides only where set), so it reads
the same as a run's config.yaml read back: `proper sim` writes it with to_yaml and the apps read
it with read_config.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shared.runtime.rules import ConfigError
from shared.runtime.schema import SERVER_KEYS, resolve

__all__ = ["ConfigError", "load_config", "read_config", "stage_cfg", "stage_defaults", "server_cfg", "to_yaml",
           "resolve_config_path", "resolve_data_path"]

ROOT = Path(__file__).resolve().parents[2]   # shared/runtime/config.py -> the repository
CONFIG_DIR = ROOT / "configs"


def resolve_config_path(name: str | Path) -> Path:
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config {name!r} not found (looked in . and {CONFIG_DIR})")


def load_config(name: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    layers = []
    if name:
        path = resolve_config_path(name)
        layers.append((str(path), OmegaConf.load(path)))
    # one layer per override, so that an error names the override that caused it
    layers += [(f"override {o!r}", _dotlist(o)) for o in overrides]
    cfg = resolve(layers)
    cfg.data.path = str(resolve_data_path(cfg.data.path))
    return cfg


def read_config(path: str | Path) -> DictConfig:
    """A run's config.yaml (written by to_yaml), checked again: a run directory made by another
    version of the code is refused here, naming the key, rather than midway through the run."""
    # (the apps read it for every message through runconfig.shared_config, which checks it once per text)
    return resolve([(str(path), OmegaConf.create(Path(path).read_text()))])


def _dotlist(override: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as e:   # e.g. key=[1 (an unclosed list)
        raise ConfigError(f"override {override!r}: not valid YAML ({str(e).splitlines()[0]})") from None


def stage_cfg(cfg: DictConfig, stage: str) -> DictConfig:
    """The training settings of one stage ("population", "group", "user", "mta.anchor", "mta.user"):
    train.* overridden by the keys the stage sets. A null is "not set" (the schema's default for an
    override), never a value to merge: merged as is it would erase train's value."""
    own = _container(OmegaConf.select(cfg, stage))
    return OmegaConf.create({**_container(cfg.train), **{k: v for k, v in own.items() if v is not None}})


def stage_defaults(stage: str = "group", **values) -> DictConfig:
    """A stage's settings (stage_cfg) at the schema's defaults, with `values` set: for code that trains
    outside a run (tests, benchmarks), so that no default is repeated anywhere but in the schema."""
    return OmegaConf.merge(stage_cfg(resolve([]), stage), values)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def server_cfg(cfg: DictConfig, stage: str) -> DictConfig:
    """The server optimizer of a federated stage (schema.SERVER_KEYS): federation.<key>, unless the
    stage sets <stage>.<key> (non-null)."""
    own = cfg.get(stage) or {}
    return OmegaConf.create({k: cfg.federation[k] if own.get(k) is None else own[k] for k in SERVER_KEYS})


def resolve_data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    cand = (ROOT / p)
    return cand.resolve() if cand.exists() else p


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
