"""`proper submit`: `flwr run` the project on the deployed federation, stream its log and exit 0
only if the run completed (server/deploy.py parses the command).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
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
LOST_S = 30           # how long the SuperLink may not answer before `proper submit` gives up


def _status(run_id: str, env, cwd) -> tuple[str, str] | None:
    """The run's status and its details from `flwr list`; None when the SuperLink does not answer."""
    info = _flwr_json(["list", CONNECTION, "--run-id", run_id], env, cwd)
    if info.get("success") is False:
        return None
    runs = info.get("runs") or [{}]
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _watch(run_id: str, env, cwd) -> str | None:
    """While the log streams: None if the SuperLink answers (within LOST_S), else why not. The stream
    has no read timeout, so a SuperLink host that vanishes without closing the connection would
    otherwise leave `flwr log --stream` waiting for ever."""
    since = time.time()
    while _status(run_id, env, cwd) is None:
        if time.time() - since >= LOST_S:
            return f"it did not answer for {LOST_S} s"
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
    with subprocess.Popen(log_cmd, env=env, cwd=tmp) as streamer:
        try:
            while streamer.poll() is None and lost is None:
                if deadline and time.time() > deadline:
                    say(f"run {run_id}: still running after {args.timeout} s; stopping it")
                    _flwr_json(["stop", run_id, CONNECTION], env, tmp)
                    break
                if time.time() >= next_check:
                    lost = _watch(run_id, env, tmp)
                    next_check = time.time() + STATUS_EVERY_S
                time.sleep(1)
        finally:
            if streamer.poll() is None:
                streamer.terminate()
    unanswered_since = None
    for _ in range(120 if lost is None else 0):
        found = _status(run_id, env, tmp)
        if found is None:   # the SuperLink does not answer
            unanswered_since = unanswered_since or time.time()
            if time.time() - unanswered_since >= LOST_S:
                lost = "it does not answer"
                break
        else:
            unanswered_since = None
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
