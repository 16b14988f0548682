"""Helpers shared by several test modules: the tiny PROPER model, free ports."""
from __future__ import annotations

import socket

import torch

from shared.method.model import ProperModel
from shared.runtime.backbone import load_backbone
from shared.runtime.targets import find_target_modules

# ----------------------------------------------------------------------------- the tiny model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def make_model(seed=0, k=5):
    lm, tok = load_backbone("tiny", seed=seed)
    return ProperModel(lm, find_target_modules(lm), k=k, d_user=16, seed=seed), tok


def randomize(model, part, seed=1):
    """Random values for one adapter part, so a test can tell a trained part from a zero one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.layers():
            for name in layer.PARTS[part]:
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, emb=None):
    with torch.no_grad():
        return model(IDS, user_emb=emb).logits


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
