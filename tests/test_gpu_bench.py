"""bench/gpu.py, the device check a session lent a GPU runs without time to debug it: its CPU dry run
must keep working (no timing is checked: speed is the benchmark's business, not a test's)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_device_check_dry_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--dry", "--parts",
                           "train,decode,memory", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "DRY RUN" in table and "device: CPU" in table
    for row in ("plain PEFT LoRA step", "stage 3 (user) step", "decoding 4 tokens, batch 32",
                "serving 64 virtual clients"):
        assert row in table
    assert table.count("qwen2-1.5b: stage") == 3 and table.count("smollm2-135m: stage") == 3


def test_the_device_check_imports_only_what_the_gpu_machine_has():
    """torch, transformers, peft, safetensors, numpy and the method's own modules: no flwr, Ray or omegaconf
    for the train, decode and memory parts."""
    code = ("import sys, bench.gpu as g; g.shape('qwen2-1.5b', True); g.proper_model(g.build_lm('smollm2-135m', 'cpu', "
            "True), 'cpu'); bad = [m for m in ('flwr', 'ray', 'omegaconf') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
