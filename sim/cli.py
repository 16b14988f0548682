"""The `proper` command.

  proper local  [--config C] [key=value ...]   all three stages in one process (centralized reference)
  proper sim    [--config C] [key=value ...]   the federation on Flower's Ray simulation engine
  proper synth  --out DIR [--users N ...]      synthetic users in LaMP's file format
  proper generate PLACE --user U [--prompt T]   generate with users' personalized models (sim/serve.py)
  proper enroll PLACE --data DIR [--user U]     personalize users who join after a run, no server round
  proper report RUN [RUN ...] --out DIR         compare runs: methods x metrics, bytes, wall time, figures
  proper audit RUN [--candidates M]             leakage audits: canary exposure, membership inference (sim/audit.py)
  proper certs | keygen | server | register | client | submit | split
                                               the deployed federation (docs/deployment.md)

A mistake in the input (bad data, a bad config value, a missing file or run directory) prints one
line, `error: <what and where>`, and exits with status 2; `proper --debug ...` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Before anything loads torch (and its OpenMP): idle OpenMP threads sleep instead of spinning. On a
# machine shared with other work, spinning threads made each SmolLM2 forward pass 35x slower (1.9 s
# against 0.055 s for one token, 2 threads; bench/gpu.py --parts serve) and a tiny `proper local` 7x;
# Ray's workers inherit it. The arithmetic is the same either way (the same-numbers check of
# docs/architecture.md ran with and without it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Exceptions that tell the user what to fix, by (module, class): an exception of a class can only
# have been raised once its module was imported, so checking costs no import (a failed
# `proper report` need not load torch). Every other exception is a bug and keeps its traceback.
USER_ERRORS = (
    ("shared.data.lamp", "LampDataError"),              # bad LaMP files: names the file and record
    ("shared.data.synthetic", "SyntheticArgumentError"),  # proper synth / data.synthetic values
    ("shared.runtime.config", "ConfigError"),           # bad config, override or run directory
    ("shared.runtime.persist", "StateFileError"),       # a corrupt or foreign state file
    ("client.serving", "ServingError"),                 # generate / enroll: a missing run part or user state
    ("shared.runtime.backbone", "MissingWheelError"),   # the embedded model's wheel is not installed
    ("shared.runtime.targets", "TargetError"),          # no FFN layers found in a model: names it and its layers
    ("omegaconf.errors", "GrammarParseError"),          # an override omegaconf cannot parse
    ("yaml", "YAMLError"),                              # a config file that is not YAML
)
FILE_ERRORS = (FileNotFoundError, PermissionError)     # their message names the path


def _run_path(cfg, config_name: str | None, prefix: str) -> Path:
    name = cfg.output.get("name") or f"{prefix}-{Path(config_name or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir) / name


def _setup_logging(verbose: bool):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL", "alembic"):  # alembic: Flower's state database
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler


def _quiet_ray():
    # ray.init's advice about a future default for GPU visibility: this project sets num_gpus
    # explicitly, so the advice does not apply, and it printed a FutureWarning in every run's log.
    warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray, Ray will no longer override",
                            category=FutureWarning, module=r"ray\._private\.worker")


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, SystemExit):  # the deployment commands exit with their message as the code
        return isinstance(exc.code, str)
    if isinstance(exc, FILE_ERRORS):
        return True
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS)
    return isinstance(exc, tuple(cls for cls in loaded if isinstance(cls, type)))


def one_line(exc: BaseException) -> str:
    text = exc.code if isinstance(exc, SystemExit) else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("local", "run all three stages in one process: one client holding every user"),
                           ("sim", "run the federation on Flower's simulation engine (Ray)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", "-c", default=None, help="a YAML under configs/ (name or path)")
        s.add_argument("--verbose", "-v", action="store_true")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. group.rounds=3")
        if name == "sim":
            s.add_argument("--resume", default=None, help="a run directory to resume from its last checkpoint")
    s = sub.add_parser("report", help="compare runs: one table (markdown + CSV) and figures (sim/report.py)")
    s.add_argument("runs", nargs="+", help="run directories")
    s.add_argument("--out", required=True, help="directory for report.md, report.csv and the PNGs")
    s.add_argument("--labels", default=None, help="comma-separated row labels, one per run")
    s.add_argument("--command", default=None, help="the command line to print in the report")
    s = sub.add_parser("audit", help="leakage audits of a finished run: canary exposure, membership inference "
                                     "(sim/audit.py)")
    s.add_argument("run", help="a finished `proper local` or `proper sim` run directory")
    s.add_argument("--candidates", type=int, default=None,
                   help="candidates sampled per canary (default: the run's privacy.canaries.candidates); fewer "
                        "audit faster at a coarser rank resolution, log2(candidates + 1) bits")
    s = sub.add_parser("synth", help="write synthetic users in LaMP's file format")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=20)
    s.add_argument("--groups", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--task", default="LaMP_2",
                   help="LaMP_2 (movie tags), LaMP_3 (product ratings 1-5), LaMP_4 (headlines in each group's "
                        "style) or LaMP_5 (paper titles in each group's style)")
    s.add_argument("--size-law", default="pareto", choices=("pareto", "uniform", "fixed"),
                   help="history sizes: heavy-tailed, uniform in [--min-profile, --max-profile], "
                        "or exactly --min-profile")
    s.add_argument("--min-profile", type=int, default=4, help="shortest history (size-law fixed: every history)")
    s.add_argument("--max-profile", type=int, default=40, help="longest history")
    s.add_argument("--pareto-shape", type=float, default=1.5,
                   help="size-law pareto: the tail's shape (smaller = heavier tail)")
    s.add_argument("--quirk-prob", type=float, default=0.2, help="chance a user departs from its group on a topic")
    from sim.serve import add_parsers as add_serve_parsers
    add_serve_parsers(sub)
    from client.deploy import add_parser as add_client_parser
    from server.deploy import add_parsers as add_deploy_parsers
    add_deploy_parsers(sub)
    add_client_parser(sub)
    for s in sub.choices.values():
        # SUPPRESS: without the flag a subcommand leaves the top-level value alone
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BaseException as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2


def _dispatch(args) -> int:
    if args.cmd in ("certs", "keygen", "server", "register", "submit"):
        from server.deploy import main as deploy_main
        return deploy_main(args)
    if args.cmd == "client":
        from client.deploy import run_client
        return run_client(args)
    if args.cmd == "split":
        from client.deploy import split_lamp
        print("\n".join(map(str, split_lamp(args.data, args.clients, args.out))))
        return 0

    if args.cmd in ("generate", "enroll"):
        _setup_logging(False)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sim.serve import enroll_main, generate_main
        return generate_main(args) if args.cmd == "generate" else enroll_main(args)
    if args.cmd == "audit":
        _setup_logging(False)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sim.audit import run_audit
        run_audit(args.run, candidates=args.candidates)
        return 0
    if args.cmd == "report":
        from sim.report import main as report_main
        return report_main(args)
    if args.cmd == "synth":
        from shared.data.synthetic import write_synthetic_lamp
        print(write_synthetic_lamp(args.out, n_users=args.users, n_groups=args.groups, seed=args.seed,
                                   task=args.task, size_law=args.size_law, quirk_prob=args.quirk_prob,
                                   min_profile=args.min_profile, max_profile=args.max_profile,
                                   pareto_shape=args.pareto_shape))
        return 0

    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from shared.runtime.config import load_config
    if args.cmd == "local":
        cfg = load_config(args.config, args.overrides)
        from sim.local import run_local
        run_local(cfg, _run_path(cfg, args.config, "local"))
        return 0
    if args.cmd == "sim":
        _quiet_ray()
        from sim.run import run_sim
        return run_sim(args.config, args.overrides, resume=args.resume)
    return 2


if __name__ == "__main__":
    sys.exit(main())
