"""The deployed federation, client side: `proper client`, a thin wrapper over flower-supernode.

  proper client --superlink HOST:PORT --data DIR --state DIR --ca ca.crt --key node.key

--data     the LaMP files of this client's users (questions.json + outputs.json); read only here
--state    this client's private state: per run a subdirectory with its users' embeddings, user
           LoRAs and routers; also the SuperNode's Flower home (installed apps)
--ca       the federation's CA certificate (verifies the server's TLS certificate)
--key      this SuperNode's private key (OpenSSH ECDSA, from `proper keygen` or `proper certs`);
           its public key must be registered on the server (`proper server --node-keys` /
           `proper register`), else the SuperLink refuses this node

The SuperNode passes data-path and state-dir to the ClientApp as node config. It runs each
ClientApp in a subprocess that talks to it over a local Runtime API on 127.0.0.1:<runtime port>
(a free one unless --runtime-port). `proper client` supervises flower-supernode: it starts it
again when the SuperLink refuses it for a while after a crash (--rejoin-s), when it falls out of
step with its replies (`ReplyWatch`), and stops it on SIGTERM / SIGINT.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication; this client's updates "
                    "travel in clear text and it trusts whatever answers at --superlink. Debugging only.")


def say(*parts):
    print("[proper]", *parts, file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_data(path: Path):
    missing = [f for f in ("questions.json", "outputs.json") if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"proper client: --data {path} lacks {', '.join(missing)} (LaMP files of this client's users)")


def node_config(data: Path, state: Path) -> str:
    """flower-supernode --node-config: TOML-ish key='value' pairs (single quotes: a literal string)."""
    for p in (data, state):
        if "'" in str(p):
            raise SystemExit(f"proper client: paths with a single quote are not supported: {p}")
    return f"data-path='{data}' state-dir='{state}'"


def supernode_command(args) -> tuple[list[str], dict[str, str]]:
    data, state = Path(args.data).resolve(), Path(args.state).resolve()
    check_data(data)
    state.mkdir(parents=True, exist_ok=True)
    cmd = ["flower-supernode", "--superlink", args.superlink,
           "--node-config", node_config(data, state),
           "--host", "127.0.0.1", "--port", str(args.runtime_port or free_port())]
    if args.insecure:
        say(INSECURE_WARNING)
        cmd.append("--insecure")
    else:
        if not args.ca or not args.key:
            raise SystemExit("proper client: needs --ca (the federation's ca.crt) and --key (this node's private "
                             "key); make a key with `proper keygen --out node.key`; or pass --insecure")
        for p in (args.ca, args.key):
            if not Path(p).is_file():
                raise SystemExit(f"proper client: {p} does not exist")
        cmd += ["--root-certificates", str(Path(args.ca).resolve()),
                "--auth-supernode-private-key", str(Path(args.key).resolve())]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    env = os.environ.copy()
    for key, value in FLWR_ENV.items():
        env.setdefault(key, value)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the SuperNode starts flower-superexec and flwr-clientapp by name: this Python's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(Path(args.flwr_home).resolve() if args.flwr_home else state / "flwr-home")
    if args.threads:  # each ClientApp subprocess inherits this
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(args.threads)
    return cmd, env



class ReplyWatch:
    """Reads flower-supernode's log, line by line, and says when the SuperNode has fallen out of
    step with its replies, which it does not recover from by itself.

    Flower 1.41's SuperNode works in lockstep: it pulls one message, then sends the first reply
    its ClientApps have ready. When a message's run stops while the SuperNode is still receiving
    it (the SuperLink was killed and came back without that run: "Run ID ... is not in `RUNNING`
    status. Ignoring message ..."; or the receipt failed: "Failed to receive message"), the
    SuperNode gives up on the message but keeps the ClientApp task it had already created. When
    that ClientApp still answers, its orphan reply is sent after the next message is pulled, in
    place of that message's reply; from then on every reply goes out one message late, after the
    server stopped waiting for it, and the node is silent in every later round (seen on CI: the
    node that was receiving when the SuperLink was killed missed every step of the resumed run).
    A fresh SuperNode holds no orphan, so both the give-up and a late reply restart it; the cost
    is at most the message in flight."""

    RUN = re.compile(r"\[RUN (\d+)")
    RECEIVING = re.compile(r"Receiving: (\S+) message")
    SENDING = re.compile(r"Sending: (\S+) message")

    def __init__(self):
        self.run = None       # the run named by the last "[RUN ...]" line
        self.waiting = None   # (run, message type) received and not yet answered

    def feed(self, line: str) -> str | None:
        """One line of the SuperNode's log; returns why it must be restarted, or None."""
        if m := self.RUN.search(line):
            self.run = m.group(1)
        elif m := self.RECEIVING.search(line):
            self.waiting = (self.run, m.group(1))
        elif m := self.SENDING.search(line):
            sent, waiting, self.waiting = (self.run, m.group(1)), self.waiting, None
            if waiting is not None and sent != waiting:
                return (f"it sent a {sent[1]} reply of run {sent[0]} while run {waiting[0]}'s {waiting[1]} "
                        "message waited for its answer: its replies go out one message late")
        elif "Failed to receive message" in line or ("Ignoring message" in line and self.waiting):
            self.waiting = None
            return ("it gave up on a message after starting its ClientApp; that ClientApp's reply would "
                    "push every later reply one message late")
        return None


def say_precision():
    """train.bf16=auto's answer on this machine, measured (once per machine) before the SuperNode starts
    any ClientApp, so that they all read the kept answer (shared/runtime/precision.py cpu_bf16). In a
    child process: this wrapper lives as long as the node and stays without torch (~300 MB each)."""
    code = ("from shared.runtime.precision import client_device, describe_precision\n"
            "print(describe_precision('auto') + \" (where the run's train.bf16 is auto)\" if client_device() == 'cpu' "
            "else 'train.bf16=auto: the GPU decides')")
    # -P: not the working directory first on the path (a folder named shared/ there would shadow the package)
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        say(out.stdout.strip().splitlines()[-1])
    else:
        say("could not measure bf16 against float32 here:", (out.stderr.strip().splitlines() or ["?"])[-1])


def run_client(args) -> int:
    """Run flower-supernode and keep it in the federation: when it exits on its own (e.g. the
    SuperLink refused to activate it), start it again for up to --rejoin-s seconds. A node that
    crashed still counts as online at the SuperLink until its heartbeat runs out (up to about
    60 s in Flower 1.41), and until then the SuperLink refuses it; an unregistered key is
    refused the same way, forever. Its log passes through `ReplyWatch`: a SuperNode out of step
    with its replies is stopped and started again at once. SIGTERM / SIGINT stop the SuperNode
    (with the ClientApps it started: it runs in its own process group) and this wrapper."""
    cmd, env = supernode_command(args)
    if not args.dry_run:
        say_precision()
    say("starting:", shlex.join(cmd))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    state = Path(args.state).resolve()
    stopping, proc = 0.0, None

    def signal_group(sig):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def on_signal(signum, frame):  # only flag and forward: waiting happens in the main loop
        nonlocal stopping
        stopping = stopping or time.time()
        if proc is not None and proc.poll() is None:
            signal_group(signal.SIGTERM)

    def relay(stream, watch: ReplyWatch, restart: list[str]):
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if (why := watch.feed(line)) and not restart:
                restart.append(why)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failing_since = None
    while True:
        started, restarting = time.time(), 0.0
        # why this SuperNode must start again, set by its own log relay: one list per process, so a
        # relay that outlives its process (joined for 5 s below) cannot stop the next one
        restart: list[str] = []
        proc = subprocess.Popen(cmd, env=env, cwd=state, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        reader = threading.Thread(target=relay, args=(proc.stdout, ReplyWatch(), restart), daemon=True)
        reader.start()
        while (rc := proc.poll()) is None:
            if time.time() - (stopping or restarting or time.time()) > 15:
                signal_group(signal.SIGKILL)
            elif restart and not (stopping or restarting):
                say(f"restarting the SuperNode: {restart[0]}")
                restarting = time.time()
                signal_group(signal.SIGTERM)
            time.sleep(0.5)
        signal_group(signal.SIGKILL)  # what it started (flower-superexec, ClientApps) goes with it
        reader.join(timeout=5)
        if stopping:
            return 0
        if restarting:  # on purpose: not an outage
            failing_since = None
            continue
        if rc == 0:
            return rc
        if time.time() - started > 120 or failing_since is None:  # it had been running: a new outage
            failing_since = time.time() if time.time() - started > 120 else started
        waited = time.time() - failing_since
        if waited >= args.rejoin_s:
            say(f"the SuperNode exited with {rc}; giving up after {waited:.0f} s. If the SuperLink refused "
                "to activate it, is this node's public key registered on the server (`proper register`)?")
            return rc or 1
        say(f"the SuperNode exited with {rc} (refused, or the server still counts this node as online "
            f"after a crash); trying again in 5 s, for {args.rejoin_s - waited:.0f} s more")
        time.sleep(5)
        if stopping:
            return 0


def split_lamp(src: str | Path, clients: int, out: str | Path) -> list[Path]:
    """Split one LaMP directory (questions.json + outputs.json) into `clients` directories
    out/client-<i>, contiguous blocks of users in file order: for trying a deployment on one
    machine, or handing each site its own users. Nothing else (e.g. groups.json) is copied."""
    import json
    src, out = Path(src), Path(out)
    check_data(src)
    questions = json.loads((src / "questions.json").read_text())
    outputs = json.loads((src / "outputs.json").read_text())
    if not 1 <= clients <= len(questions):
        raise SystemExit(f"cannot split {len(questions)} users over {clients} clients")
    golds = {str(g["id"]): g for g in outputs["golds"]}
    base, extra = divmod(len(questions), clients)
    dirs, start = [], 0
    for i in range(clients):
        block = questions[start:start + base + (1 if i < extra else 0)]
        start += len(block)
        d = out / f"client-{i + 1}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "questions.json").write_text(json.dumps(block, indent=1, ensure_ascii=False) + "\n")
        mine = {"task": outputs.get("task"), "golds": [golds[str(q["id"])] for q in block if str(q["id"]) in golds]}
        (d / "outputs.json").write_text(json.dumps(mine, indent=1, ensure_ascii=False) + "\n")
        dirs.append(d)
    return dirs


def add_parser(sub):
    s = sub.add_parser("split", help="split one LaMP directory into per-client directories")
    s.add_argument("--data", required=True, help="directory with questions.json and outputs.json")
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--out", required=True, help="writes <out>/client-1 ... client-N")

    s = sub.add_parser("client", help="run a SuperNode holding this client's users (TLS + authentication)")
    s.add_argument("--superlink", required=True, help="the server's HOST:PORT")
    s.add_argument("--data", required=True, help="directory with the LaMP files of this client's users")
    s.add_argument("--state", required=True, help="directory for this client's private state")
    s.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
    s.add_argument("--key", help="this SuperNode's private key (its .pub registered on the server)")
    s.add_argument("--runtime-port", type=int, default=None,
                   help="local port for the SuperNode's Runtime API (default: a free one)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per ClientApp (OMP_NUM_THREADS)")
    s.add_argument("--max-retries", type=int, default=None, help="give up after this many failed connections")
    s.add_argument("--max-wait-time", type=float, default=None, help="give up connecting after this many seconds")
    s.add_argument("--rejoin-s", type=float, default=180,
                   help="keep restarting a SuperNode the SuperLink refuses for this long (default 180 s; "
                        "0: give up at once)")
    s.add_argument("--flwr-home", default=None, help="Flower home of this SuperNode (default <state>/flwr-home)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no authentication (never in production)")
    s.add_argument("--dry-run", action="store_true", help="print the flower-supernode command and exit")
