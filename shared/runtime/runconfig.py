"""How the server and the clients of one run agree on its configuration and directory.

Two ways in:
- `proper sim` resolves the configuration once, writes it to <run dir>/config.yaml and sets
  PROPER_RUN_DIR (environment variables reach Flower's simulation actors); both apps read that,
  checked against the schema again (read_config).
- `flwr run .` passes [tool.flwr.app.config] / --run-config: "config" (a YAML under configs/),
  "overrides" (space-separated key=value pairs, e.g. --run-config "overrides='group.rounds=3'")
  and "run-dir". Flower refuses keys the app does not declare in [tool.flwr.app.config]; a
  declared extra key would be taken as one more override. Without "run-dir" the run directory is
  <output.dir>/flwr-run-<run id>.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from shared.runtime.config import load_config, read_config
from shared.runtime.process import PROCESS

RESERVED = {"config", "overrides", "run-dir"}


def run_config_from_context(context) -> tuple[DictConfig, Path]:
    env_dir = os.environ.get("PROPER_RUN_DIR")
    if env_dir and (Path(env_dir) / "config.yaml").is_file():
        return shared_config(Path(env_dir) / "config.yaml"), Path(env_dir)
    rc = dict(context.run_config)
    overrides = shlex.split(str(rc.get("overrides", "") or ""))
    overrides += [f"{k}={v}" for k, v in rc.items() if k not in RESERVED]
    cfg = load_config(str(rc.get("config") or "") or None, overrides)
    run_dir = rc.get("run-dir") or Path(cfg.output.dir) / f"flwr-run-{context.run_id}"
    return cfg, Path(run_dir).resolve()


def shared_config(path: Path) -> DictConfig:
    """The run's config.yaml as the apps read it for every message: one read-only object per text.
    A SuperNode serving virtual clients reads it about three times per client (mods, handler), and
    read_config's private copy cost 23 ms each on 2 loaded cores, more than a tiny client's whole
    evaluation; read-only, so that no reader can change what the next one sees."""
    text = path.read_text()
    if PROCESS.config is None or PROCESS.config[0] != text:
        cfg = read_config(path)
        OmegaConf.set_readonly(cfg, True)
        PROCESS.config = (text, cfg)
    return PROCESS.config[1]
