"""The `proper` command.

  proper local  [--config C] [key=value ...]   all three stages in one process (centralized reference)
  proper sim    [--config C] [key=value ...]   the federation on Flower's Ray simulation engine
  proper synth  --out DIR [--users N ...]      synthetic users in LaMP's file format
  proper report RUN [RUN ...] --out DIR         compare runs: methods x metrics, bytes, wall time, figures
  proper certs | keygen | server | register | client | submit | split
                                               the deployed federation (docs/deployment.md)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _run_path(cfg, config_name: str | None, prefix: str) -> Path:
    name = cfg.output.get("name") or f"{prefix}-{Path(config_name or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir) / name


def _setup_logging(verbose: bool):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler


def main(argv=None):
    p = argparse.ArgumentParser(prog="proper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    s = sub.add_parser("synth", help="write synthetic users in LaMP's file format")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=20)
    s.add_argument("--groups", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    from client.deploy import add_parser as add_client_parser
    from server.deploy import add_parsers as add_deploy_parsers
    add_deploy_parsers(sub)
    add_client_parser(sub)
    args = p.parse_args(argv)

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

    if args.cmd == "report":
        from sim.report import main as report_main
        return report_main(args)
    if args.cmd == "synth":
        from shared.data.synthetic import write_synthetic_lamp
        print(write_synthetic_lamp(args.out, n_users=args.users, n_groups=args.groups, seed=args.seed))
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
        from sim.run import run_sim
        return run_sim(args.config, args.overrides, resume=args.resume)
    return 2


if __name__ == "__main__":
    sys.exit(main())
