"""`proper sim`: the ServerApp and ClientApp on Flower's simulation engine (Ray), in this process.

One SuperNode per user by default (cross-device); federation.users_per_client > 1 packs several
users per SuperNode (cross-silo). The resolved configuration goes to <run dir>/config.yaml and
PROPER_RUN_DIR tells both apps (and Ray's actors, which inherit the environment) where it is.
`--resume RUN_DIR` continues a run from its last checkpoint with the configuration it started with.

To use an existing Ray cluster, set RAY_ADDRESS (see docs/deployment.md).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

from shared.method.signature_start import refuse_in_federation
from shared.runtime.config import ConfigError, load_config, read_config, to_yaml
from shared.runtime.persist import atomic_write_text

log = logging.getLogger("proper.sim")


def _checked_users(cfg) -> list:
    """The run's users, read as the clients will read them: a malformed file is refused here, in one
    line naming the file and record, before any SuperNode starts."""
    from client.trainer import load_users
    from shared.data.lamp import LampDataError
    spec, users = load_users(cfg)
    if not any(u.train for u in users):  # users with no history are served, but someone must train
        raise LampDataError(f"{cfg.data.path}: every user's profile is empty, nothing to train on")
    refuse_in_federation(cfg, spec)
    return users


def examples_cap(cfg, users: list) -> int:
    """federation.max_examples where the config leaves it null: the most training examples one
    simulated client holds (its block of users, canary items included), which is what an honest
    training reply claims at most (server/validation.py)."""
    from shared.data.canaries import run_canaries, with_canaries
    users = with_canaries(users, run_canaries(cfg, users))
    per_client = int(cfg.federation.users_per_client)
    return max(sum(len(u.train) for u in users[i:i + per_client]) for i in range(0, len(users), per_client))


def prepare_run(config: str | None, overrides: list[str], resume: str | None) -> Path:
    if resume:
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; not a run directory")
        if overrides:
            raise ConfigError("--resume continues a run with its own config; drop the overrides")
        return run_dir
    cfg = load_config(config, overrides)
    name = cfg.output.get("name") or f"sim-{Path(config or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(cfg.output.dir) / name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from sim.local import prepare_data
    cfg.data.path = str(Path(prepare_data(cfg, run_dir)).resolve())
    cfg.output.dir = str(run_dir.parent)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir


def run_sim(config: str | None, overrides: list[str], resume: str | None = None) -> int:
    run_dir = prepare_run(config, overrides, resume)
    if resume:   # a corrupt checkpoint is refused here, naming its file, before any engine starts
        from server.checkpoint import Checkpoint
        Checkpoint(run_dir).load()
    cfg = read_config(run_dir / "config.yaml")
    users = _checked_users(cfg)
    n_users, per_client = len(users), int(cfg.federation.users_per_client)
    n_clients = math.ceil(n_users / per_client)
    virtual = cfg.simulation.get("virtual_clients")
    # virtual clients: M SuperNodes serve the N clients (shared/runtime/virtual.py); the server,
    # which holds no data, learns N here
    n_nodes = min(int(virtual), n_clients) if virtual else n_clients
    # the server orders a Ray run's nodes by partition where it knows it is one (server/federation.py nodes)
    changed = cfg.simulation.get("num_clients") != n_clients
    cfg.simulation.num_clients = n_clients
    if cfg.federation.max_examples is None:   # the server caps what a reply may claim (issue 35)
        cfg.federation.max_examples = max(1, examples_cap(cfg, users))
        changed = True
    if int(cfg.federation.min_available_clients) < n_clients:
        # The simulation starts every SuperNode, but they register one by one: without this the
        # server began while some were still registering, and its first steps left them out.
        cfg.federation.min_available_clients = n_clients
        changed = True
    if changed:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    previous_run_dir = os.environ.get("PROPER_RUN_DIR")
    os.environ["PROPER_RUN_DIR"] = str(run_dir)
    try:
        return _simulate(cfg, run_dir, n_users, per_client, n_nodes)
    finally:  # a later run in this process must not inherit this one's directory
        if previous_run_dir is None:
            os.environ.pop("PROPER_RUN_DIR", None)
        else:
            os.environ["PROPER_RUN_DIR"] = previous_run_dir


def _simulate(cfg, run_dir: Path, n_users: int, per_client: int, n_nodes: int) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts its workers (the simulated clients) at nice 15; on a machine shared with other
    # work they then get a fraction of the CPU that `proper local` gets (bench/fed_vs_local.py)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Flower logs through its own logger; keep ours readable beside it.
    log.info("run directory %s: %d users on %d SuperNodes (%d per client%s)", run_dir, n_users, n_nodes, per_client,
             f", {cfg.simulation.num_clients} virtual clients" if cfg.simulation.get("virtual_clients") else "")
    # decided (measured, where it must be) here, once, before any client process asks: they read the answer
    from shared.runtime.precision import describe_precision
    log.info("%s", describe_precision(cfg.train.bf16))

    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import app as server_app
    sim = cfg.simulation
    if sim.engine == "inprocess":  # sim/inprocess.py: no Ray, one process
        from sim.inprocess import run_inprocess
        return _finished(run_dir, lambda: run_inprocess(server_app, client_app, n_nodes))
    if os.environ.get("RAY_ADDRESS"):
        _connect_ray_cluster(os.environ["RAY_ADDRESS"], run_dir)
    backend = backend_config(cfg, visible_gpus())
    return _finished(run_dir, lambda: run_simulation(server_app=server_app, client_app=client_app,
                                                     num_supernodes=n_nodes, backend_config=backend),
                     engine_failed=_engine_failed)


def visible_gpus() -> float:
    """The GPUs Ray can give the ClientApps: the cluster's (Ray already initialised: RAY_ADDRESS, or
    logical GPUs declared with ray.init(num_gpus=N)), else the ones torch sees on this machine."""
    import ray
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    import torch
    return float(torch.cuda.device_count())


def backend_config(cfg, gpus: float) -> dict:
    """Flower's Ray backend config: each ClientApp actor's CPUs and GPU share. Ray places
    1 / client_gpus actors on each GPU (client_gpus=0.25: four ClientApps share one GPU), as many as
    the CPUs allow. Refuses here, in one line, what would leave Flower's actor pool empty."""
    sim = cfg.simulation
    # A single chain trains one node at a time: one ClientApp with every core should beat several
    # with one core each, of which all but one would wait (not measured; Ray gives an actor
    # OMP_NUM_THREADS = its num_cpus, so torch uses that many threads).
    cpus = sim.get("client_cpus") or (int(sim.get("ray_cpus") or os.cpu_count() or 1)
                                      if cfg.federation.chains == 1 else 1)
    share = float(sim.client_gpus)
    if share > 0 and gpus == 0:
        # Flower would find no actor a GPU share and stop its engine while the ServerApp waits
        log.warning("simulation.client_gpus=%g but no GPU is visible to torch or Ray: the clients run on "
                    "the CPU", share)
        share = 0.0
    backend = {"client_resources": {"num_cpus": float(cpus), "num_gpus": share}}
    if sim.get("ray_cpus") and not _ray_initialised():
        backend["init_args"] = {"num_cpus": int(sim.ray_cpus)}
    total = float(sim.get("ray_cpus") or os.cpu_count() or 1)
    if not _ray_initialised() and float(cpus) > total:
        raise ConfigError(f"simulation.client_cpus={cpus:g} asks for more CPUs per client than Ray has "
                          f"({total:g}): no ClientApp could start")
    return backend


def _ray_initialised() -> bool:
    import ray
    return ray.is_initialized()


def _engine_failed(exc: BaseException) -> bool:
    """Whether run_simulation raised because its engine (not the ServerApp) failed: Flower then stops
    its runtime but leaves the ServerApp's thread (not a daemon) waiting for replies that cannot come."""
    return any(t.is_alive() and not t.daemon and "server_th" in t.name for t in threading.enumerate())


def _end_engine_failure(exc: BaseException, run_dir: Path):
    """One line and exit status 2, now: a normal exit would wait for Flower's ServerApp thread."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip()) or type(cause).__name__
    print(f"error: the simulation engine could not start its clients ({type(cause).__name__}: {text}); "
          f"run directory {run_dir}", file=sys.stderr, flush=True)
    try:
        import ray
        ray.shutdown()
    finally:
        logging.shutdown()
        os._exit(2)


def _finished(run_dir: Path, simulate, engine_failed=lambda exc: False) -> int:
    t0 = time.time()
    try:
        simulate()
    except Exception as e:  # the ServerApp raised: the checkpoint holds every finished step
        if engine_failed(e):
            _end_engine_failure(e, run_dir)
        log.error("the run stopped: %s: %s. Resume with: proper sim --resume %s", type(e).__name__, e, run_dir)
        return 1
    table = run_dir / "table.md"
    if not table.exists():
        log.error("the run ended without a results table; see the log above. Resume with: "
                  "proper sim --resume %s", run_dir)
        return 1
    export_shared_parts(run_dir)
    from shared.evaluation.groups import recovery_note, run_group_recovery
    from shared.runtime.persist import atomic_write_text
    from shared.runtime.results import RunDir
    rec = run_group_recovery(run_dir)  # synthetic users only: None without groups.json or a group stage
    if rec is not None:  # read from the clients' private files on this one disk, after the run
        RunDir(run_dir).log({"kind": "groups", "stage": "group", **rec})
        text = table.read_text()
        if "group recovery" not in text:   # a resumed run's table may have it already
            atomic_write_text(table, text.rstrip("\n") + f"\n- {recovery_note(rec)}\n")
        log.info("group recovery after group round %d: ARI %.3f, purity %.3f (%d users)",
                 rec["round"], rec["ari"], rec["purity"], rec["users"])
    log.info("done in %.0f s; results in %s", time.time() - t0, run_dir)
    return 0


def export_shared_parts(run_dir: Path):
    """The final shared parts from the server's checkpoint as the files `proper local` writes:
    population_lora/ and group.safetensors in the run directory. The simulated clients share this
    one copy (a deployed client keeps its own, client/trainer.py) for serving and enrollment
    (client/serving.py). Loads the backbone once more, in this process."""
    from client.trainer import export_shared_parts as export
    from client.trainer import get_model
    from server.checkpoint import Checkpoint
    cfg = read_config(run_dir / "config.yaml")
    loaded = Checkpoint(run_dir).load()
    parts = loaded[1] if loaded else {}
    if not parts.get("population"):  # MTA and runs that never finished a population round
        return
    model, _ = get_model(cfg)
    if model.merged:  # the in-process engine's model: W comes back exactly (adapters.py)
        model.unmerge_population()
    model.load_part_state("population", parts["population"], source=f"{run_dir}/checkpoint")
    if parts.get("group"):
        model.load_part_state("group", parts["group"], source=f"{run_dir}/checkpoint")
    export(model, run_dir, bool(parts.get("group")), cfg.model.name)


def _connect_ray_cluster(address: str, run_dir: Path):
    """Join an existing Ray cluster (RAY_ADDRESS) before Flower would start a local one.

    Actors of a cluster started by `ray start` are spawned by that cluster's raylets, so they do
    not inherit this process's environment: PROPER_RUN_DIR (and this venv's sys.path) must travel
    in the job's runtime_env, or the ClientApps would fall back to the default config. Flower's
    RayBackend skips its own ray.init() when Ray is already initialised and shuts Ray down (this
    driver's connection only, not the cluster) at the end. Every Ray node must see the run
    directory and the code at the same paths (a shared filesystem), see docs/deployment.md."""
    import sys

    import ray
    env = {"PROPER_RUN_DIR": str(run_dir), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for key in ("TOKENIZERS_PARALLELISM", "HF_HOME", "PROPER_CACHE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if ray.is_initialized():
        ray.shutdown()
    log.info("joining the Ray cluster at %s", address)
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level=logging.WARNING)
    log.info("Ray cluster resources: %s", ray.cluster_resources())
