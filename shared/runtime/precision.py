"""Numeric precision on CPU: bfloat16 autocast only where the CPU computes it natively."""
from __future__ import annotations

import torch

from shared.runtime.schema import check_value


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 or newer)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(value) -> bool:
    """train.bf16: true, false, or "auto" (the default): bf16 where the CPU computes it natively.
    Why auto: bf16 autocast was 1.6x faster than float32 on a machine with native bf16
    (docs/results/bench_throughput.md) but 20x slower on an AVX2-only one (124 s against 6 s for
    one SmolLM2 step of 8 LaMP-2 items), where every bf16 matmul is emulated."""
    check_value("train.bf16", value)   # the schema's rule: a value may come from outside a config
    return cpu_has_bf16() if value == "auto" else value


def autocast(cfg):
    """bfloat16 autocast on CPU where it pays (use_bf16); float32 master weights either way."""
    dtype = torch.bfloat16 if use_bf16(cfg["bf16"]) else None
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
