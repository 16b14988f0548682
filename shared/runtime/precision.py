"""Numeric precision and device: bfloat16 autocast only where it is faster than float32 here."""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.runtime.schema import check_value

log = logging.getLogger("proper.precision")
# bf16 autocast is chosen on a CPU only if its measured step is this much faster than float32's
BF16_MARGIN = 1.15
_MEASURED: dict[str, dict] = {}   # this process's answer, by machine key


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 or newer)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(value) -> bool:
    """train.bf16: true, false, or "auto" (the default): bf16 autocast on the CPU only where it has
    native bf16 kernels *and* they are measured faster than float32 on this machine (cpu_bf16).
    Why measured: native bf16 is not enough. bf16 autocast was 1.6x faster than float32 on an AMD
    EPYC (docs/results/bench_throughput.md), 20x slower on an AVX2-only CPU (every bf16 matmul
    emulated), and 2x slower on an Intel Xeon *with* avx512_bf16 at the main job's shapes
    (docs/results/bench_precision.md), where reading the CPU's flags had picked it."""
    check_value("train.bf16", value)   # the schema's rule: a value may come from outside a config
    return cpu_bf16()["bf16"] if value == "auto" else value


def _machine_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | torch {torch.__version__}"


def _cache_file() -> Path:
    root = os.environ.get("PROPER_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "proper") / "precision.json"


def measure_cpu_bf16(reps: int = 12, tokens: int = 128, d_in: int = 576, d_out: int = 1536) -> dict:
    """Seconds of one linear layer's training step (forward, and the backward to its input, as a
    frozen layer under a LoRA computes it) in float32 and under bf16 autocast (float32 weights cast
    per call, as the stages run), interleaved, medians. The shape is SmolLM2-135M's FFN at the
    batch of a small client (2 x 64 tokens); ~0.1 s on 2 cores."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    x = torch.randn(tokens, d_in, generator=g).requires_grad_(True)

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.linear(x, w)
        y.float().sum().backward()
        x.grad = None
        return time.perf_counter() - t

    step(True), step(False)   # warm-up: oneDNN builds its kernels on first use
    t32, t16 = [], []
    for _ in range(reps):
        t32.append(step(False))
        t16.append(step(True))
    return {"float32_s": statistics.median(t32), "bf16_s": statistics.median(t16)}


def cpu_bf16() -> dict:
    """{"bf16": whether auto picks bf16 autocast on this CPU, "why": one line}, decided once per machine:
    no native kernels -> float32 without measuring; else measure_cpu_bf16, kept in
    $PROPER_CACHE/precision.json (default ~/.cache/proper) keyed by CPU model and torch version, so
    every process of a run (Ray's workers, a client's ClientApps) reads the same answer as the one
    that measured first (`proper sim` / `proper local` / `proper client` do, at their start).
    PROPER_BF16=0|1 overrides both (e.g. to repeat a run made on another machine)."""
    forced = os.environ.get("PROPER_BF16")
    if forced in ("0", "1"):
        return {"bf16": forced == "1", "why": f"PROPER_BF16={forced}"}
    if not cpu_has_bf16():
        return {"bf16": False, "why": "no native bf16 kernels on this CPU"}
    key = _machine_key()
    if key in _MEASURED:
        return _MEASURED[key]
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("bf16"), bool)):
        m = measure_cpu_bf16()
        ratio = m["float32_s"] / max(m["bf16_s"], 1e-12)
        entry = {"bf16": ratio >= BF16_MARGIN, **m,
                 "why": f"bf16 autocast measured {ratio:.2f}x float32's speed on this CPU "
                        f"(picked where >= {BF16_MARGIN}x)"}
        try:
            from shared.runtime.persist import atomic_write_text
            known = known if isinstance(known, dict) else {}
            known[key] = entry
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        except OSError as e:   # a read-only home: measured again by the next process, no harm
            log.warning("could not keep the precision choice in %s: %s", path, e)
    _MEASURED[key] = entry
    return entry


def describe_precision(value, device: str = "cpu") -> str:
    """One line for a run's log: what train.bf16 computes in here, and why."""
    if torch.device(device).type == "cuda":
        return f"train.bf16={value}: {'bf16 autocast' if bf16_on(device, value) else 'float32 (TF32)'} on the GPU"
    if value != "auto":
        return f"train.bf16={value}: {'bf16 autocast' if value else 'float32'}"
    c = cpu_bf16()
    return f"train.bf16=auto: {'bf16 autocast' if c['bf16'] else 'float32'} ({c['why']})"


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
