"""`proper sim` and GPUs, on a machine without one: a GPU share asked for where none is visible runs on the
CPU with one warning; Ray places 1 / client_gpus ClientApps on each GPU (logical GPUs declared to Ray);
an engine that cannot start its clients ends the run at once with one line and status 2."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from shared.runtime.config import ConfigError, load_config
from sim.run import backend_config


def test_a_gpu_share_without_a_gpu_runs_on_the_cpu_with_one_warning(caplog):
    cfg = load_config("tiny", ["simulation.client_gpus=0.5"])
    with caplog.at_level(logging.WARNING, logger="proper.sim"):
        backend = backend_config(cfg, gpus=0)
    assert backend["client_resources"]["num_gpus"] == 0.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "client_gpus=0.5" in warnings[0].getMessage()
    assert "on the CPU" in warnings[0].getMessage()


def test_a_gpu_share_with_gpus_is_kept():
    cfg = load_config("tiny", ["simulation.client_gpus=0.25"])
    assert backend_config(cfg, gpus=1)["client_resources"]["num_gpus"] == 0.25


def test_more_cpus_per_client_than_ray_has_is_refused_before_the_engine_starts():
    cfg = load_config("tiny", ["simulation.client_cpus=64", "simulation.ray_cpus=1"])
    with pytest.raises(ConfigError, match="client_cpus=64.*no ClientApp could start"):
        backend_config(cfg, gpus=0)


@pytest.fixture
def ray_with_logical_gpus():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    # logical resources: Ray hands them out without looking for the hardware
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_places_four_clients_on_each_gpu_at_a_quarter_share(ray_with_logical_gpus):
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    from sim.run import visible_gpus
    cfg = load_config("tiny", ["simulation.client_gpus=0.25", "simulation.client_cpus=1"])
    gpus = visible_gpus()   # Ray is initialised: its declared GPUs, not torch's (none here)
    assert gpus == 2
    backend = backend_config(cfg, gpus)
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert "init_args" not in backend   # Flower uses the Ray this process started
    actors = pool_size_from_resources(backend["client_resources"])   # how Flower sizes its ClientApp pool
    assert actors / gpus == 4


# A forced engine failure: the resources go past the CPU check (patched out) to Flower, whose actor pool is
# then empty. Without the fix the ServerApp waited for its clients until stopped by hand.
FAILING = textwrap.dedent("""
    import sys
    import sim.run
    real = sim.run.backend_config
    def too_big(cfg, gpus):
        backend = real(cfg, gpus)
        backend["client_resources"]["num_cpus"] = 64.0
        backend["init_args"] = {"num_cpus": 1}
        return backend
    sim.run.backend_config = too_big
    from sim.cli import main
    sys.exit(main(["sim", "-c", "tiny", "output.dir=" + sys.argv[1], "output.name=fails"]))
""")


@pytest.mark.slow
def test_an_engine_that_cannot_start_its_clients_ends_the_run_with_one_error(tmp_path):
    done = subprocess.run([sys.executable, "-c", FAILING, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not start its clients" in errors[0] and "ActorPool is empty" in errors[0]


@pytest.mark.slow
def test_a_simulation_given_gpu_shares_on_a_machine_without_one_runs_on_the_cpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "-m", "sim.cli", "sim", "-c", "tiny", "simulation.client_gpus=0.5",
                           f"output.dir={tmp_path}", "output.name=run"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("no GPU is visible") == 1
    assert (tmp_path / "run" / "table.md").is_file()
