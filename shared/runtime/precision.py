"""Numeric precision and device: bfloat16 autocast only where the CPU (or GPU) computes it natively."""
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


def autocast(cfg, device: str = "cpu"):
    """bfloat16 autocast where it pays (use_bf16, or bf16_on for a GPU); float32 master weights
    either way."""
    dtype = torch.bfloat16 if bf16_on(device, cfg["bf16"]) else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def client_device(client_gpus: float | None = None) -> str:
    """Where a client computes, decided here alone: "cuda" where a GPU is allowed and CUDA is present,
    else "cpu". client_gpus: a simulated client's share (simulation.client_gpus): 0 keeps it on the CPU,
    > 0 allows the GPU Ray gave it (CUDA_VISIBLE_DEVICES names its share); None (`proper local`, a
    deployed client, serving): any GPU there is. A client given a GPU on a machine without one computes
    on the CPU rather than failing: CI never has a GPU. On CUDA, TF32 matmuls are allowed (allow_tf32)."""
    allowed = client_gpus is None or float(client_gpus) > 0
    if allowed and torch.cuda.is_available():
        allow_tf32()
        return "cuda"
    return "cpu"


def allow_tf32():
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (Ampere and newer): the float32
    master weights' matmuls run at several times the speed, with a 10-bit mantissa. No effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def bf16_on(device: str, value) -> bool:
    """train.bf16 on `device`: on a GPU, "auto" is bf16 where the GPU has it (Ampere and newer:
    torch.cuda.is_bf16_supported()); on the CPU, use_bf16."""
    if torch.device(device).type != "cuda":
        return use_bf16(value)
    check_value("train.bf16", value)
    return bool(torch.cuda.is_bf16_supported()) if value == "auto" else bool(value)
