"""Device selection of a simulated client (simulation.client_gpus), checked on a CPU-only machine by
standing in for CUDA: CI never has a GPU."""
import pytest
import torch

from shared.runtime import precision
from shared.runtime.precision import bf16_on, client_device


@pytest.mark.parametrize("gpus, cuda, expected", [(0, True, "cpu"), (0.5, True, "cuda"), (1, False, "cpu"),
                                                  (0, False, "cpu")])
def test_a_client_computes_on_cuda_only_when_given_a_gpu_that_is_there(monkeypatch, gpus, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert client_device(gpus) == expected


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_auto_on_a_gpu_follows_the_gpu(monkeypatch, has_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    # the CPU's answer must not count
    monkeypatch.setattr(precision, "cpu_bf16", lambda: {"bf16": not has_bf16, "why": "stand-in"})
    assert bf16_on("cuda", "auto") is has_bf16
    assert bf16_on("cuda", False) is False and bf16_on("cuda", True) is True
    assert bf16_on("cpu", "auto") is (not has_bf16)


def test_autocast_on_the_cpu_is_unchanged():
    with precision.autocast({"bf16": True}):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.bfloat16
    with precision.autocast({"bf16": False}):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
