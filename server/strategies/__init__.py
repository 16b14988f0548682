"""The server optimizer of each server-coordinated stage, composed as Flower composes its strategies.

  population.py    PopulationAverage: Flower's FedAvg, the population LoRA averaged by "num-examples";
  group.py         GroupAverage: FedAvg with one hook replaced, the average: experts weighted by
                   routing mass, routers by examples; it also builds the next round's pool of mixtures;
  privacy.py       PrivateAverage (privacy.dp): an average under Flower's own DP wrapper
                   (held_records.py: what the wrapper wraps);
  fedavgm.py, fedadam.py, fedyogi.py
                   Flower's server optimizers stepping on such an average (average_of.py);
  trained_replies.py
                   the outermost wrapper: replies that trained nothing are left out;
  chains.py        not a strategy but a schedule: how a round's clients are visited.

A stage builds its average (server/stages/) and make_strategy puts the rest around it:
TrainedReplies(ServerFedAvgM | ServerFedAdam | ServerFedYogi(average=[PrivateAverage(] average [)])).
federation.server_opt picks the optimizer (a stage may override it and its settings in its own
section, e.g. population.server_lr); fedavg with server_lr 1 is plain FedAvg. The optimizer's state
(FedAvgM's momentum, FedAdam's and FedYogi's moments) lives in it across a stage's rounds and goes
into the checkpoint (state_tensors / load_state), so a resumed run continues exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

from server.strategies.fedadam import ServerFedAdam
from server.strategies.fedavgm import ServerFedAvgM
from server.strategies.fedyogi import ServerFedYogi
from server.strategies.held_records import DP_WEIGHT
from server.strategies.metrics import mean_scalar_metrics
from server.strategies.privacy import PrivateAverage, dp_metrics
from shared.runtime.config import server_cfg, stage_cfg

# the settings every average takes: the round's clients are chosen by the chains (chains.py), not by Flower
ALL_NODES = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)


def server_settings(cfg, stage: str) -> dict:
    """<stage>.<key> where the stage sets it, else federation.<key> (checked by the config schema)."""
    return dict(server_cfg(cfg, stage))


def dp_settings(cfg):
    """privacy.dp when differential privacy is on (noise_multiplier set), else None."""
    dp = cfg.privacy.dp
    return dp if dp.noise_multiplier is not None else None


def average_settings(cfg) -> dict:
    """The keyword arguments of a stage's average (FedAvg's): under privacy.dp every reply weighs 1."""
    private = dp_settings(cfg) is not None
    return dict(ALL_NODES, weighted_by_key=DP_WEIGHT if private else "num-examples",
                train_metrics_aggr_fn=dp_metrics if private else mean_scalar_metrics)


def needs_start(cfg, stage: str) -> bool:
    """Whether the stage's server step needs the parameters a round started from (all but plain
    FedAvg; DP and the robust group average clip each update against the round's start,
    shared/method/robust.py): the server then asks one client for the seeded initial ones (query.init)."""
    s = server_settings(cfg, stage)
    return s["server_opt"] in ("fedadam", "fedyogi") or float(s["server_lr"]) != 1.0 or \
        (s["server_opt"] == "fedavgm" and float(s["server_momentum"]) != 0.0) or \
        dp_settings(cfg) is not None or \
        (stage == "group" and str(cfg.federation.aggregation) in ("median", "trimmed_mean"))


def make_strategy(cfg, stage: str, average: Strategy):
    """The stage's server optimizer over `average` (under privacy.dp: over Flower's DP wrapper of it)."""
    s, dp = server_settings(cfg, stage), dp_settings(cfg)
    if dp is not None:
        average = PrivateAverage(average, dp, stage)
    kw = average_settings(cfg)   # FedAvg's settings; the server optimizer's own average is `average`
    if s["server_opt"] in ("fedavg", "fedavgm"):
        momentum = float(s["server_momentum"]) if s["server_opt"] == "fedavgm" else 0.0
        return ServerFedAvgM(average, server_learning_rate=float(s["server_lr"]), server_momentum=momentum, **kw)
    opt = ServerFedAdam if s["server_opt"] == "fedadam" else ServerFedYogi
    return opt(average, eta=float(s["server_lr"]), eta_l=float(stage_cfg(cfg, stage).lr),
               beta_1=float(s["beta_1"]), beta_2=float(s["beta_2"]), tau=float(s["tau"]), **kw)


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
