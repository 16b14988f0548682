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
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the Flower app (pyproject.toml) that `flwr run` ships
CONNECTION = "proper"                            # the name of the SuperLink connection we write
DEFAULT_PORT = 9092
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


# ------------------------------------------------------------------ certificates and keys

def _write_private(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def keygen(out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode key pair: OpenSSH-format ECDSA P-384 (what flower-supernode and
    `flwr supernode register` accept). The private key stays on the client host; the server
    operator registers only FILE.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key_path = Path(out)
    pub_path = key_path.with_name(key_path.name + ".pub") if key_path.suffix != ".key" else key_path.with_suffix(".pub")
    if key_path.exists() and not force:
        if not pub_path.exists():
            raise SystemExit(f"{key_path} exists without {pub_path}; remove it or pass --force")
        return key_path, pub_path
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH) + b"\n")
    return key_path, pub_path


def make_certs(out: str | Path, hosts=(), nodes: int = 0, days: int = 365, force: bool = False) -> dict:
    """A local CA (ca.crt, ca.key), the SuperLink's certificate (server.crt, server.key) signed by
    it for localhost, 127.0.0.1, ::1 and every name or address in `hosts`, and `nodes` SuperNode key
    pairs node-<i>.key / node-<i>.pub. Existing files are kept (so adding nodes later does not
    invalidate anything) unless force; a --host the server certificate lacks gets a new server
    certificate from the same CA (clients keep their ca.crt)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))
    made = {}

    def private_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    if force or not (out / "ca.crt").exists() or not (out / "ca.key").exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proper-fl federation CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
        _write_private(out / "ca.key", private_pem(ca_key))
        (out / "ca.crt").write_bytes(ca.public_bytes(pem))
        made["ca"] = out / "ca.crt"
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)

    names = ["localhost", "127.0.0.1", "::1", *hosts]
    reissue = force or "ca" in made or not (out / "server.crt").exists() or not (out / "server.key").exists()
    if not reissue:  # an existing certificate that lacks a requested name: a new one, same CA
        san = x509.load_pem_x509_certificate((out / "server.crt").read_bytes()).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value
        have = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        reissue = any(_canon(h) not in have for h in hosts)
    if reissue:
        sans, seen = [], set()
        for h in names:
            if _canon(h) in seen:
                continue
            seen.add(_canon(h))
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        key = ec.generate_private_key(ec.SECP384R1())
        cn = hosts[0] if hosts else "localhost"
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA384()))
        _write_private(out / "server.key", private_pem(key))
        (out / "server.crt").write_bytes(cert.public_bytes(pem))
        made["server"] = out / "server.crt"
    for i in range(1, nodes + 1):
        key_path = out / f"node-{i}.key"
        if force or not key_path.exists():
            keygen(key_path, force=True)
            made[f"node-{i}"] = key_path
    return made


def _canon(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


# ------------------------------------------------------------------ the SuperLink

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
    cmd = ["flower-superlink", "--host", args.host, "--port", str(args.port),
           "--database", str(workdir / "state.db")]
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
    if not (workdir / "state.db").exists():  # a new database knows no registrations
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


# ------------------------------------------------------------------ submitting a run

def _flwr_json(args: list[str], env, cwd) -> dict:
    res = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, env=env, cwd=cwd)
    try:
        return json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return {"success": False, "error-message": (res.stdout + res.stderr).strip()}


def run_config_file(config: str | None, overrides: list[str], run_dir: str | None, path: Path) -> Path:
    """The run config as a TOML file (`flwr run --run-config FILE.toml`): no quoting trouble."""
    import tomli_w
    rc = {"overrides": " ".join(shlex.quote(o) for o in overrides)}
    if config:
        rc["config"] = config
    if run_dir:
        rc["run-dir"] = run_dir
    path.write_text(tomli_w.dumps(rc))
    return path


def submit(args) -> int:
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"overrides must look like key=value, got {bad}")
    tmp = Path(tempfile.mkdtemp(prefix="proper-submit-"))
    try:
        return _submit(args, tmp)
    except KeyboardInterrupt:
        say("interrupted: the run goes on at the server (stop it with `flwr stop <run id> proper`)")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(args, tmp: Path) -> int:
    if args.superlink:  # a SuperLink elsewhere: a connection of our own in a private Flower home
        flwr_home = tmp / "flwr-home"
        if not args.insecure and not args.ca:
            raise SystemExit("proper submit --superlink needs --ca (the federation's ca.crt), or --insecure")
        if args.insecure:
            say(INSECURE_WARNING)
        write_connection(flwr_home, args.superlink, args.ca, args.insecure)
    else:
        flwr_home = Path(args.dir).resolve() / "flwr-home"
        if not (flwr_home / "config.toml").exists():
            raise SystemExit(f"{args.dir}: no flwr-home/config.toml; start `proper server --dir {args.dir}` "
                             "first, or pass --superlink HOST:PORT --ca ca.crt")
    env = flwr_env(flwr_home)
    rc = run_config_file(args.config, args.overrides, args.run_dir, tmp / "run_config.toml")
    t0 = time.time()
    started = _flwr_json(["run", str(Path(args.app).resolve()), CONNECTION, "--run-config", str(rc)], env, tmp)
    if not started.get("success"):
        say("flwr run failed:", started.get("error-message"))
        return 2
    run_id = str(started["run-id"])
    say(f"started run {run_id} (app {started.get('fab-id')} {started.get('fab-hash')}); run dir on the server: "
        f"{args.run_dir or '<server dir>/runs/flwr-run-' + run_id}")
    if args.no_wait:
        print(run_id)
        return 0
    # `flwr log --stream` returns when the run has finished; it exits 0 whatever the outcome,
    # so the run's status comes from `flwr list --run-id` (polled: it may lag the log briefly)
    log_cmd = ["flwr", "log", run_id, CONNECTION, "--stream"]
    deadline = time.time() + args.timeout if args.timeout else None
    status, details = "", ""
    with subprocess.Popen(log_cmd, env=env, cwd=tmp) as streamer:
        try:
            while streamer.poll() is None:
                if deadline and time.time() > deadline:
                    say(f"run {run_id}: still running after {args.timeout} s; stopping it")
                    _flwr_json(["stop", run_id, CONNECTION], env, tmp)
                    break
                time.sleep(1)
        finally:
            if streamer.poll() is None:
                streamer.terminate()
    for _ in range(120):
        info = _flwr_json(["list", CONNECTION, "--run-id", run_id], env, tmp)
        runs = info.get("runs") or [{}]
        status, details = str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))
        if status.startswith("finished"):
            break
        if streamer.returncode not in (None, 0) and not status:
            break
        time.sleep(1)
    if not status.startswith("finished"):
        say(f"run {run_id}: the log stream ended while the run is {status or 'in an unknown state'} "
            "(did the server stop?); `flwr list` shows it later")
    ok = status == "finished:completed"
    say(f"run {run_id}: {status or 'unknown status'}{'' if details in ('', 'N/A') else ' (' + details + ')'} "
        f"after {time.time() - t0:.0f} s")
    if ok and args.run_dir and Path(args.run_dir).is_absolute() and (Path(args.run_dir) / "table.md").exists():
        say(f"results in {args.run_dir}")
    return 0 if ok else 1


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
