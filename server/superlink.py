"""`proper server` and `proper register`: flower-superlink with TLS and SuperNode authentication,
the `flwr` CLI's connection to it, and the SuperNode keys it accepts (server/deploy.py parses the
commands). Also the environment and messages every flwr process of the deployment shares.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONNECTION = "proper"                            # the name of the SuperLink connection we write
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can reach "
                    "the port can read the traffic, join the federation and submit runs. Use it only "
                    "on a trusted network, for debugging.")


def flwr_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """The environment for every flwr process: no runtime pip installs, no update checks."""
    env = os.environ.copy()
    for key, value in FLWR_ENV.items():
        env.setdefault(key, value)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp): this
    # Python's scripts directory first, also when the virtualenv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def say(*parts):
    print("[proper]", *parts, file=sys.stderr, flush=True)


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def write_connection(flwr_home: Path, address: str, ca: str | None, insecure: bool, name: str = CONNECTION):
    """The `flwr` CLI's connection to this SuperLink, in <flwr_home>/config.toml (made the default)."""
    import tomli
    import tomli_w
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = tomli.loads(path.read_text()) if path.exists() else {}
    conn = {"address": address}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca).resolve())
    cfg.setdefault("superlink", {})[name] = conn
    cfg["superlink"]["default"] = name
    path.write_text(tomli_w.dumps(cfg))
    return path


def wait_for_port(host: str, port: int, limit_s: float = 60, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _cert_paths(args) -> tuple[str, str, str]:
    certs = Path(args.certs) if args.certs else None
    ca = args.ca or (certs / "ca.crt" if certs else None)
    cert = args.cert or (certs / "server.crt" if certs else None)
    key = args.key or (certs / "server.key" if certs else None)
    if not (ca and cert and key):
        raise SystemExit("proper server: TLS needs --certs DIR (ca.crt, server.crt, server.key) or --ca, "
                         "--cert and --key; make them with `proper certs --out DIR`, or pass --insecure")
    for p in (ca, cert, key):
        if not Path(p).is_file():
            raise SystemExit(f"proper server: {p} does not exist")
    return str(Path(ca).resolve()), str(Path(cert).resolve()), str(Path(key).resolve())


def superlink_command(args, workdir: Path) -> list[str]:
    cmd = ["flower-superlink", "--host", args.host, "--port", str(args.port)]
    if getattr(args, "state", "file") == "file":  # no --database: Flower keeps its state in RAM
        cmd += ["--database", str(workdir / "state.db")]
    if args.insecure:
        return cmd + ["--insecure"]
    ca, cert, key = _cert_paths(args)
    return cmd + ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key, "--enable-supernode-auth"]


def public_keys(paths) -> list[Path]:
    """Key files, or directories of *.pub files."""
    out = []
    for p in map(Path, paths or []):
        if p.is_dir():
            out += sorted(p.glob("*.pub"))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"no such public key file or directory: {p}")
    return out


def register_keys(flwr_home: Path, keys, connection: str = CONNECTION) -> dict[str, str]:
    """`flwr supernode register` each key; key -> node id. Registrations live in the SuperLink's
    database; <dir>/registered-keys.json remembers them so a restart does not ask again."""
    import hashlib
    record_path = Path(flwr_home).parent / "registered-keys.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    ids = {}
    for key in public_keys(keys):
        fields = key.read_bytes().split()  # "ecdsa-sha2-nistp384 <base64> [comment]": the key itself
        digest = hashlib.sha256(fields[1] if len(fields) > 1 else key.read_bytes()).hexdigest()
        if digest in record:
            ids[str(key)] = record[digest]
            say(f"SuperNode key {key}: registered before, node {record[digest]}")
            continue
        res = subprocess.run(["flwr", "supernode", "register", str(key.resolve()), connection, "--format", "json"],
                             capture_output=True, text=True, env=flwr_env(flwr_home), cwd=flwr_home)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            raise SystemExit(f"registering {key} failed: {res.stdout}{res.stderr}") from None
        if payload.get("success"):
            ids[str(key)] = record[digest] = str(payload["node-id"])
            say(f"registered SuperNode key {key} as node {payload['node-id']}")
        elif "already in use" in payload.get("error-message", ""):
            ids[str(key)] = record[digest] = "registered before"
            say(f"SuperNode key {key} was registered before")
        else:  # `flwr --format json` exits 0 even on failure: the payload says
            raise SystemExit(f"registering {key} failed: {payload.get('error-message')}")
        record_path.write_text(json.dumps(record, indent=1))
    return ids


def run_server(args) -> int:
    workdir = Path(args.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    if args.insecure:
        say(INSECURE_WARNING)
        if args.node_keys:
            say("--insecure: SuperNode authentication is off, the --node-keys are not used")
    cmd = superlink_command(args, workdir)
    if getattr(args, "state", "file") == "memory" or not (workdir / "state.db").exists():
        # a new (or in-memory) state knows no registrations: register every key again
        (workdir / "registered-keys.json").unlink(missing_ok=True)
    address = f"{connect_host(args.host)}:{args.port}"
    write_connection(flwr_home, address, None if args.insecure else _cert_paths(args)[0], args.insecure)
    if args.host in ("0.0.0.0", "::"):
        say("listening on every interface: the Control API (submit runs, register nodes) shares this port "
            "and has no account authentication in Flower's open-source SuperLink; restrict who can reach "
            "it (docs/deployment.md, 'Security')")
    say("starting:", shlex.join(cmd))
    env = flwr_env(flwr_home)
    proc = subprocess.Popen(cmd, cwd=workdir, env=env)
    stopping = False

    def on_signal(signum, frame):  # only flag and forward: waiting happens in the main loop
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not wait_for_port(connect_host(args.host), args.port, limit_s=120, proc=proc) or stopping:
            say("the SuperLink did not come up; see its log above")
            return 1
        if not args.insecure:
            register_keys(flwr_home, args.node_keys)
        security = "INSECURE" if args.insecure else "TLS, SuperNode authentication"
        say(f"SuperLink ready on {args.host}:{args.port} ({security}); "
            f"working directory {workdir}")
        say(f"submit a run from this host: proper submit --dir {workdir} -c <config> data.task=<task>")
        while proc.poll() is None:
            time.sleep(0.5)
        return 0 if stopping else proc.returncode
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_register(args) -> int:
    flwr_home = Path(args.dir).resolve() / "flwr-home"
    if not (flwr_home / "config.toml").exists():
        raise SystemExit(f"{args.dir}: no flwr-home/config.toml; is it the --dir of a `proper server`?")
    register_keys(flwr_home, args.keys)
    return 0
