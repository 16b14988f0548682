"""The deployed federation, server side: `proper certs`, `proper keygen`, `proper server`,
`proper register` and `proper submit`, thin wrappers over Flower's own tools.

  proper certs  --out DIR [--host NAME ...] [--nodes N]   a local CA, the SuperLink's TLS certificate
                                                         (SAN: localhost, 127.0.0.1 and every --host),
                                                         and N SuperNode key pairs for testing
  proper keygen --out FILE                               one SuperNode key pair (FILE, FILE.pub)
  proper server --certs DIR --node-keys K.pub ... [--dir D] [--host H] [--port P]
                                                         flower-superlink with TLS and SuperNode
                                                         authentication; registers the node keys
  proper register --dir D K.pub ...                      register more SuperNode keys later
  proper submit [--dir D | --superlink H:P --ca CA] -c CONFIG [key=value ...] [--run-dir R]
                                                         `flwr run` the project on the federation,
                                                         stream its log, exit 0 only if it completed

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port
(--host/--port). `proper server` keeps everything it owns under --dir: the SuperLink database
(state.db: registered nodes and runs survive a restart), the Flower home of the SuperLink and of
the `flwr` CLI (flwr-home/: the connection named "proper", installed apps), and, as the working
directory of the ServerApp, the runs (runs/<name>: checkpoint, table, plots). Insecure mode (no
TLS, no SuperNode authentication) only with --insecure, and it says so loudly.

Nothing here reads user data: the server never needs it (set data.task in the config).

This module parses the commands; server/certs.py makes the certificates and keys,
server/superlink.py runs the SuperLink and registers keys, server/submit.py submits a run.
"""
from __future__ import annotations

from pathlib import Path

from server.certs import keygen, make_certs
from server.submit import submit
from server.superlink import run_register, run_server, say

ROOT = Path(__file__).resolve().parent.parent   # the Flower app (pyproject.toml) that `flwr run` ships
DEFAULT_PORT = 9092


# ------------------------------------------------------------------ argument parsing (sim/cli.py)

def add_parsers(sub):
    s = sub.add_parser("certs", help="make a local CA, the server's TLS certificate and test SuperNode keys")
    s.add_argument("--out", required=True,
                   help="directory for ca.crt, ca.key, server.crt, server.key, node-<i>.key/.pub")
    s.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address clients use to reach the server (repeatable); "
                        "localhost, 127.0.0.1 and ::1 are always included")
    s.add_argument("--nodes", type=int, default=0, help="also make this many SuperNode key pairs (testing)")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--force", action="store_true",
                   help="replace existing files (a new CA: clients need the new ca.crt)")

    s = sub.add_parser("keygen", help="make one SuperNode key pair (on the client host)")
    s.add_argument("--out", required=True,
                   help="private key file; the public key goes to <out>.pub (or .pub for a .key)")
    s.add_argument("--force", action="store_true")

    s = sub.add_parser("server", help="run the SuperLink (TLS + SuperNode authentication)")
    s.add_argument("--dir", default="proper-server", help="working directory: database, Flower home, runs/")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"the SuperLink's one HTTPS port (default {DEFAULT_PORT})")
    s.add_argument("--certs", help="directory with ca.crt, server.crt, server.key (from `proper certs`)")
    s.add_argument("--ca", help="CA certificate (instead of --certs)")
    s.add_argument("--cert", help="server certificate (instead of --certs)")
    s.add_argument("--key", help="server private key (instead of --certs)")
    s.add_argument("--node-keys", nargs="*", default=[],
                   help="SuperNode public keys (files, or directories of *.pub) to register")
    s.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (never in production)")
    s.add_argument("--state", choices=("file", "memory"), default="file",
                   help="where the SuperLink keeps runs, nodes and messages: 'file' (<dir>/state.db, SQLite; "
                        "survives a restart) or 'memory' (Flower's in-memory state: no SQLite lock waits when "
                        "many SuperNodes reply at once; a restart forgets runs and registrations, the run's "
                        "own checkpoint still resumes it)")

    s = sub.add_parser("register", help="register SuperNode public keys with a running `proper server`")
    s.add_argument("--dir", default="proper-server", help="the server's --dir")
    s.add_argument("keys", nargs="+", help="public key files or directories of *.pub")

    s = sub.add_parser("submit", help="start a run on the deployed federation and wait for it")
    s.add_argument("--dir", default="proper-server", help="the server's --dir (submitting from the server host)")
    s.add_argument("--superlink", help="HOST:PORT of a SuperLink elsewhere (instead of --dir)")
    s.add_argument("--ca", help="with --superlink: the federation's ca.crt")
    s.add_argument("--insecure", action="store_true", help="with --superlink: a SuperLink started with --insecure")
    s.add_argument("--config", "-c", default=None, help="a YAML under configs/ (name), as on the server")
    s.add_argument("--run-dir", default=None,
                   help="the run directory on the server host (relative: under the server's --dir); "
                        "submit again with the same one to resume a run from its checkpoint")
    s.add_argument("--app", default=str(ROOT), help="the Flower app to ship (default: this project)")
    s.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    s.add_argument("--no-wait", action="store_true", help="print the run id and return")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.task=LaMP_2 group.rounds=2")


def main(args) -> int:
    if args.cmd == "certs":
        made = make_certs(args.out, hosts=args.host, nodes=args.nodes, days=args.days, force=args.force)
        for what, path in made.items():
            say(f"made {what}: {path}")
        say(f"in {Path(args.out).resolve()}: give ca.crt (public) to every client; keep ca.key and server.key "
            "on the server host; node-<i>.key go to client i, node-<i>.pub to `proper server --node-keys`")
        return 0
    if args.cmd == "keygen":
        key, pub = keygen(args.out, force=args.force)
        say(f"private key {key} (keep it on this host), public key {pub} (send it to the server operator)")
        return 0
    if args.cmd == "server":
        return run_server(args)
    if args.cmd == "register":
        return run_register(args)
    if args.cmd == "submit":
        return submit(args)
    return 2
