"""The client optimizer and its learning rate over a stage's rounds (shared/method/optim.py)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from shared.method.optim import make_optimizer, round_lr


def _cfg(**kw):
    return OmegaConf.create({"lr": 0.1, "rounds": 5, "lr_schedule": "constant", "lr_min_ratio": 0.1,
                             "optimizer": "adamw", "momentum": 0.0, "weight_decay": 0.0, **kw})


def test_cosine_schedule_goes_from_lr_to_its_floor_over_the_rounds():
    cfg = _cfg(lr_schedule="cosine")
    lrs = [round_lr(cfg, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[2] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert round_lr(_cfg(lr_schedule="cosine", rounds=1), 1) == pytest.approx(0.1)
    assert [round_lr(_cfg(), r) for r in (1, 3, 5)] == [0.1, 0.1, 0.1]


def test_sgd_moves_by_lr_times_the_gradient_and_adamw_by_about_lr_whatever_its_size():
    """Why both exist: a fresh AdamW's first step is lr * sign(g) for any gradient scale."""
    for scale in (1e-4, 1.0):
        moves = {}
        for name in ("sgd", "adamw"):
            w = torch.nn.Parameter(torch.zeros(3))
            opt = make_optimizer([w], _cfg(optimizer=name))
            (w * torch.tensor([1.0, -2.0, 3.0]) * scale).sum().backward()
            opt.step()
            moves[name] = -w.detach()
        assert torch.allclose(moves["sgd"], 0.1 * scale * torch.tensor([1.0, -2.0, 3.0]))
        assert torch.allclose(moves["adamw"], 0.1 * torch.tensor([1.0, -1.0, 1.0]), rtol=1e-3)


def test_sgd_momentum_and_unknown_optimizers():
    assert make_optimizer([torch.nn.Parameter(torch.zeros(1))], _cfg(optimizer="sgd", momentum=0.9)) \
        .param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="train.optimizer"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], _cfg(optimizer="lion"))


def test_warmup_ramps_each_param_groups_lr_over_the_rounds_first_steps():
    """train.warmup_steps: a fresh optimizer's first N steps at lr * step / N, every group its own lr;
    optimizer_step applies it before stepping, so the first step moves AdamW by about lr / N."""
    from shared.method.optim import warmup
    from shared.method.stages import optimizer_step
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, weight_decay=0.0)
    seen = []
    for _ in range(6):
        warmup(opt, 4)
        seen.append([g["lr"] for g in opt.param_groups])
    assert seen == [pytest.approx([0.1 * s / 4, 0.5 * s / 4]) for s in (1, 2, 3, 4, 4, 4)]
    still = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    warmup(still, 0)
    assert still.param_groups[0]["lr"] == 0.1
    for steps, move in ((0, 0.1), (4, 0.025)):
        w = torch.nn.Parameter(torch.zeros(1))
        opt = make_optimizer([w], _cfg())
        optimizer_step(opt, (3.0 * w).sum(), [w], _cfg(warmup_steps=steps, grad_clip=1.0))
        assert -w.item() == pytest.approx(move, rel=1e-3)
