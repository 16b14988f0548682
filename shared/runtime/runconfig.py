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

from omegaconf import DictConfig

from shared.runtime.config import load_config, read_config

RESERVED = {"config", "overrides", "run-dir"}


def run_config_from_context(context) -> tuple[DictConfig, Path]:
    env_dir = os.environ.get("PROPER_RUN_DIR")
    if env_dir and (Path(env_dir) / "config.yaml").is_file():
        return read_config(Path(env_dir) / "config.yaml"), Path(env_dir)
    rc = dict(context.run_config)
    overrides = shlex.split(str(rc.get("overrides", "") or ""))
    overrides += [f"{k}={v}" for k, v in rc.items() if k not in RESERVED]
    cfg = load_config(str(rc.get("config") or "") or None, overrides)
    run_dir = rc.get("run-dir") or Path(cfg.output.dir) / f"flwr-run-{context.run_id}"
    return cfg, Path(run_dir).resolve()
