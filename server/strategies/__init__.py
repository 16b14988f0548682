"""The server optimizer of each server-coordinated stage, built from Flower's strategies.

  population  Flower's FedAvg family as it is: the population LoRA averaged by "num-examples",
              then the server step of FedAvgM / FedAdam / FedYogi (population.py);
  group       the same Flower classes with one hook replaced, the average: experts weighted by
              routing mass, routers by examples (group.py); FedAdam's or FedYogi's step then acts
              on the group part's pseudo-gradient exactly as on the population LoRA's;
  chains      not a strategy but a schedule: how a round's clients are visited (chains.py);
  privacy.dp  Flower's DP wrapper placed between the average and the server step (privacy.py).

federation.server_opt picks the class (a stage may override it and its settings in its own section,
e.g. population.server_lr); fedavg with server_lr 1 is plain FedAvg. The optimizer's state (FedAvgM's
momentum, FedAdam's and FedYogi's moments) lives in the strategy across a stage's rounds and goes
into the checkpoint (state_tensors / load_state), so a resumed run continues exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from server.strategies.group import GroupAggregation
from server.strategies.population import PopulationMessages, mean_scalar_metrics
from server.strategies.privacy import DP_WEIGHT, DPAverage, add_privacy, dp_metrics, dp_settings
from shared.runtime.config import server_cfg, stage_cfg

SERVER_OPTS = {"fedavg": FedAvgM, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def server_settings(cfg, stage: str) -> dict:
    """<stage>.<key> where the stage sets it, else federation.<key> (checked by the config schema)."""
    return dict(server_cfg(cfg, stage))


def needs_start(cfg, stage: str) -> bool:
    """Whether the stage's server step needs the parameters a round started from (all but plain
    FedAvg): the server then asks one client for the seeded initial ones (query.init)."""
    s = server_settings(cfg, stage)
    return s["server_opt"] in ("fedadam", "fedyogi") or float(s["server_lr"]) != 1.0 or \
        (s["server_opt"] == "fedavgm" and float(s["server_momentum"]) != 0.0) or \
        dp_settings(cfg) is not None   # DP clips each update against the round's start


def make_strategy(cfg, stage: str):
    s = server_settings(cfg, stage)
    base = SERVER_OPTS[s["server_opt"]]
    mixin = PopulationMessages if stage == "population" else GroupAggregation
    private = dp_settings(cfg) is not None
    # MRO: base, its parents, [DPAverage: Flower's DP wrapper between the average and the server step], mixin, FedAvg
    bases = (base, DPAverage, mixin) if private else (base, mixin)
    cls = type(f"{'DP' if private else ''}{mixin.__name__}{base.__name__}", bases, {})
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
              weighted_by_key=DP_WEIGHT if private else "num-examples",
              train_metrics_aggr_fn=dp_metrics if private else mean_scalar_metrics)
    if base is FedAvgM:
        momentum = float(s["server_momentum"]) if s["server_opt"] == "fedavgm" else 0.0
        strategy = cls(server_learning_rate=float(s["server_lr"]), server_momentum=momentum, **kw)
    else:
        strategy = cls(eta=float(s["server_lr"]), eta_l=float(stage_cfg(cfg, stage).lr),
                       beta_1=float(s["beta_1"]), beta_2=float(s["beta_2"]), tau=float(s["tau"]), **kw)
    return add_privacy(strategy, cfg, stage) if private else strategy


# ---- the server optimizer's state in the checkpoint
def state_tensors(strategy) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("m_t", "v_t"):                       # FedAdam / FedYogi: {key: ndarray}
        for key, value in (getattr(strategy, name, None) or {}).items():
            out[f"{name}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    for i, value in enumerate(getattr(strategy, "momentum_vector", None) or []):   # FedAvgM: a list
        out[f"momentum_vector/{i:05d}"] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def load_state(strategy, tensors: dict[str, torch.Tensor] | None):
    if not tensors:
        return
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, sub = key.partition("/")
        grouped.setdefault(name, {})[sub] = value.numpy()
    for name in ("m_t", "v_t"):
        if name in grouped:
            setattr(strategy, name, grouped[name])
    if "momentum_vector" in grouped:
        strategy.momentum_vector = [grouped["momentum_vector"][k] for k in sorted(grouped["momentum_vector"])]
