"""`proper submit`: `flwr run` the project on the deployed federation, stream its log and exit 0
only if the run completed (server/deploy.py parses the command).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from server.superlink import CONNECTION, INSECURE_WARNING, flwr_env, say, write_connection


def _flwr_json(args: list[str], env, cwd) -> dict:
    res = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, env=env, cwd=cwd)
    try:
        return json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        return {"success": False, "error-message": (res.stdout + res.stderr).strip()}


STATUS_EVERY_S = 30   # while the log streams, how often the run's status is asked
LOST_S = 60           # how long the SuperLink may not answer (and at least LOST_TRIES times in a row)
LOST_TRIES = 3        # before `proper submit` gives up: a busy SuperLink may miss one answer


def _status(run_id: str, env, cwd) -> tuple[str, str] | None:
    """The run's status and its details from `flwr list`; None when the SuperLink does not answer."""
    info = _flwr_json(["list", CONNECTION, "--run-id", run_id], env, cwd)
    if info.get("success") is False:
        return None
    runs = info.get("runs") or [{}]
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


MAX_ATTACH = 100      # how often a log stream that ended before the run did is attached again


class _Tee(threading.Thread):
    """Copies a `flwr log --stream` process's output to ours, leaving out the first `skip` bytes: a
    stream attached again starts from the beginning of the run's log, which was shown already."""

    def __init__(self, pipe, skip: int):
        super().__init__(daemon=True)
        self.pipe, self.skip, self.seen = pipe, skip, 0

    def run(self):
        out = getattr(sys.stdout, "buffer", None)
        for chunk in iter(lambda: self.pipe.read1(65536), b""):
            self.seen += len(chunk)
            cut = min(self.skip, len(chunk))
            self.skip -= cut
            if chunk[cut:]:
                if out is not None:
                    out.write(chunk[cut:])
                else:
                    sys.stdout.write(chunk[cut:].decode(errors="replace"))
                sys.stdout.flush()


def _attach(log_cmd: list[str], env, cwd, skip: int) -> tuple[subprocess.Popen, _Tee]:
    streamer = subprocess.Popen(log_cmd, env=env, cwd=cwd, stdout=subprocess.PIPE)
    tee = _Tee(streamer.stdout, skip)
    tee.start()
    return streamer, tee


def _watch(run_id: str, env, cwd) -> str | None:
    """While the log streams: None if the SuperLink answers (within LOST_S), else why not. The stream
    has no read timeout, so a SuperLink host that vanishes without closing the connection would
    otherwise leave `flwr log --stream` waiting for ever."""
    since, tries = time.time(), 0
    while _status(run_id, env, cwd) is None:
        tries += 1
        if tries >= LOST_TRIES and time.time() - since >= LOST_S:
            return f"it did not answer for {time.time() - since:.0f} s"
        time.sleep(2)
    return None


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
    # so the run's status comes from `flwr list --run-id` (polled: it may lag the log briefly).
    # A SuperLink that dies under us (crash, reboot) must end this command, not hang it: the stream
    # is watched with a status query every STATUS_EVERY_S, and LOST_S without an answer ends it
    # with the way back (docs/deployment.md, "Faults": restart the server, submit the same --run-dir)
    log_cmd = ["flwr", "log", run_id, CONNECTION, "--stream"]
    deadline = time.time() + args.timeout if args.timeout else None
    status, details, lost = "", "", None
    next_check = time.time() + STATUS_EVERY_S
    shown, attaches = 0, 0
    while True:
        streamer, tee = _attach(log_cmd, env, tmp, skip=shown)
        ended_by_us = False
        try:
            while streamer.poll() is None and lost is None:
                if deadline and time.time() > deadline:
                    say(f"run {run_id}: still running after {args.timeout} s; stopping it")
                    _flwr_json(["stop", run_id, CONNECTION], env, tmp)
                    ended_by_us = True
                    break
                if time.time() >= next_check:
                    lost = _watch(run_id, env, tmp)
                    next_check = time.time() + STATUS_EVERY_S
                time.sleep(1)
        finally:
            if streamer.poll() is None:
                streamer.terminate()
            streamer.wait()
            tee.join(timeout=10)
            shown = max(shown, tee.seen)
        if lost is not None or ended_by_us or attaches >= MAX_ATTACH:
            break
        # the stream also ends without the run ending (seen with 30 SuperNodes on 2 busy cores,
        # docs/results/reliability.md): attach again while the SuperLink says the run goes on
        found = _status(run_id, env, tmp)
        if found is None or not found[0] or found[0].startswith("finished"):
            break
        attaches += 1
        say(f"run {run_id}: the log stream ended while the run is {found[0]}; attaching again")
        time.sleep(2)
    unanswered_since, tries = None, 0
    for _ in range(120 if lost is None else 0):
        found = _status(run_id, env, tmp)
        if found is None:   # the SuperLink does not answer
            unanswered_since, tries = unanswered_since or time.time(), tries + 1
            if tries >= LOST_TRIES and time.time() - unanswered_since >= LOST_S:
                lost = f"it did not answer for {time.time() - unanswered_since:.0f} s"
                break
        else:
            unanswered_since, tries = None, 0
            status, details = found
            if status.startswith("finished"):
                break
            if streamer.returncode not in (None, 0) and not status:
                break
        time.sleep(1)
    if lost is not None:
        where = args.run_dir or f"runs/flwr-run-{run_id}"
        say(f"run {run_id}: lost the SuperLink ({lost}) after {time.time() - t0:.0f} s; the run did not finish. "
            f"Its checkpoint keeps every finished step: start `proper server` again with the same --dir, then "
            f"submit again with the same config and --run-dir {where} to resume it (docs/deployment.md, 'Faults')")
        return 1
    if not status.startswith("finished"):
        say(f"run {run_id}: the log stream ended while the run is {status or 'in an unknown state'} "
            "(did the server stop?); `flwr list` shows it later")
    ok = status == "finished:completed"
    say(f"run {run_id}: {status or 'unknown status'}{'' if details in ('', 'N/A') else ' (' + details + ')'} "
        f"after {time.time() - t0:.0f} s")
    if ok and args.run_dir and Path(args.run_dir).is_absolute() and (Path(args.run_dir) / "table.md").exists():
        say(f"results in {args.run_dir}")
    return 0 if ok else 1
