"""A load test of the real deployment on this machine: N SuperNodes (`proper client` processes, one
user each, tiny model) over TLS with SuperNode authentication, joining and leaving during a run.

    python -m bench.load --nodes 30 --out runs/load-30

What happens (docs/deployment.md, "Faults"; docs/results/reliability.md, "Deployment faults"):
`proper server` starts; two thirds of the clients start; a run of several population and group
rounds is submitted with federation.min_available_clients below N; once population:1 is under way
the other third joins; when population:2 has reached the first `--stop` clients they are stopped
(SIGTERM, in the middle of the round), and once that round is checkpointed `--back` of them start
again. Memory is sampled every second (psutil, resident memory of each process family).

It prints, and writes to <out>/load.md and <out>/load.json (atomically), one table: nodes started
and online, steps completed, seconds and participation per step (from the run's
checkpoint/progress.json and rounds.jsonl), peak memory of the server's process family and of all
clients together. Exit status 0 when the run completed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench.fleet import Fleet, MemoryPeaks
from shared.runtime.persist import atomic_write_text

MiB = 2 ** 20


def plan(nodes: int, stop: int | None = None, back: int | None = None) -> dict:
    """Who starts when: 2/3 at first, the rest during population:1; ~1/6 stopped during
    population:2 and ~3/5 of those brought back."""
    initial = max(1, math.ceil(2 * nodes / 3))
    stop = max(1, nodes // 6) if stop is None else stop
    back = max(1, (3 * stop) // 5) if back is None else back
    if not (stop <= initial and back <= stop):
        raise SystemExit(f"--stop {stop} must be at most the {initial} first clients, --back at most --stop")
    return {"nodes": nodes, "initial": initial, "late": nodes - initial, "stop": stop, "back": back,
            "min_available": max(1, initial // 2)}


def overrides(p: dict, population_rounds: int, group_rounds: int, timeout_s: float) -> list[str]:
    return ["data.task=LaMP_2", f"federation.min_available_clients={p['min_available']}",
            f"federation.timeout_s={timeout_s:.0f}", f"population.rounds={population_rounds}",
            f"group.rounds={group_rounds}", "eval.stages=[user]"]


def drive(fleet: Fleet, p: dict, args, mem: MemoryPeaks) -> dict:
    """The scenario; returns what happened (events with times, online counts seen, submit's exit)."""
    t0, events, online_seen = time.time(), [], []

    def event(what: str):
        events.append({"t": round(time.time() - t0, 1), "event": what})
        print(f"[load] {events[-1]['t']:7.1f} s  {what}", flush=True)

    def look():
        online_seen.append({"t": round(time.time() - t0, 1), "online": fleet.online()})

    fleet.start_server(state=args.state)
    event("server ready")
    first = list(range(1, p["initial"] + 1))
    for i in first:
        fleet.start_client(i)
    fleet.wait_online(p["initial"], limit_s=60 + 10 * p["initial"])
    look()
    event(f"{p['initial']} clients online")
    submit = fleet.submit("load", *overrides(p, args.population_rounds, args.group_rounds, args.timeout_s))
    event("run submitted")
    deadline, phase, last_look = time.time() + args.limit_s, 0, 0.0
    stopped = first[:p["stop"]]
    while submit.poll() is None:
        if mem.exhausted is not None:
            event(f"memory available fell to {mem.exhausted / MiB:.0f} MiB: the guard killed the fleet")
            break
        if time.time() > deadline:
            event(f"still running after {args.limit_s:.0f} s: stopping the submit")
            fleet.procs.stop("submit-load")
            break
        if phase == 0 and fleet.received(1, "train.population") >= 1:
            for i in range(p["initial"] + 1, p["nodes"] + 1):
                fleet.start_client(i)
            event(f"population:1 under way: started the {p['late']} late clients")
            phase = 1
        elif phase == 1 and all(fleet.received(i, "train.population") >= 2 for i in stopped):
            for i in stopped:  # signal all first: they leave together, in the middle of the round
                fleet.procs.procs[f"client-{i}"].terminate()
            for i in stopped:
                fleet.stop_client(i)
            event(f"population:2 under way: stopped clients {stopped}")
            phase = 2
        elif phase == 2 and "population:2" in fleet.progress("load")["done"]:
            for i in stopped[:p["back"]]:
                fleet.start_client(i)
            event(f"population:2 done: restarted clients {stopped[:p['back']]}")
            phase = 3
        if time.time() - last_look > args.look_every:
            last_look = time.time()
            look()
        time.sleep(1)
    rc = submit.wait()
    event(f"submit exited with {rc}")
    look()
    return {"events": events, "state": args.state, "online": online_seen, "submit_rc": rc,
            "wall_s": round(time.time() - t0, 1), "phase": phase}


def summarize(fleet: Fleet, p: dict, happened: dict, mem: MemoryPeaks, starts: int) -> dict:
    progress = fleet.progress("load")
    rounds = fleet.rounds("load")
    table_path = fleet.run_dir("load") / "table.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else []
    steps = []
    for name in progress.get("done", []):
        part = progress.get("participation", {}).get(name, {})
        steps.append({"step": name, "seconds": round(float(progress["seconds"].get(name, 0.0)), 1),
                      **{k: part.get(k) for k in ("sent", "ok", "failed", "silent", "users")}})
    train = [r for r in rounds if r.get("kind") == "train"]
    return {"plan": p, "state": happened.get("state", "file"), "completed": happened["submit_rc"] == 0 and bool(table),
            "memory_guard_mib": None if mem.exhausted is None else round(mem.exhausted / MiB),
            "nodes_started": p["nodes"], "client_starts": starts,
            "online_max": max((o["online"] for o in happened["online"]), default=0),
            "online_at_end": happened["online"][-1]["online"] if happened["online"] else 0,
            "steps_done": len(steps), "train_rounds_logged": len(train), "steps": steps,
            "run_seconds": round(sum(s["seconds"] for s in steps), 1),
            "wall_s": happened["wall_s"], "submit_rc": happened["submit_rc"],
            "peak_server_mib": round(mem.server / MiB), "peak_clients_mib": round(mem.clients / MiB),
            "peak_client_node_mib": round(mem.clients_per_node / MiB), "memory_samples": mem.samples,
            "machine_used_start_mib": round(mem.machine_start / MiB),
            "machine_used_peak_mib": round(mem.machine_peak / MiB),
            "table": [{"stage": r.get("stage"), "users": r.get("users"), "nodes": r.get("nodes")} for r in table],
            "events": happened["events"], "online": happened["online"]}


def markdown(s: dict) -> str:
    p = s["plan"]
    lines = [f"Load test: {p['nodes']} SuperNodes over TLS with SuperNode authentication, one user each, tiny model; "
             f"the SuperLink's state {'in memory' if s['state'] == 'memory' else 'in its SQLite file'}",
             "",
             "| what | value |", "|---|---|",
             f"| nodes started | {s['nodes_started']} ({p['initial']} at first, {p['late']} during population:1; "
             f"{p['stop']} stopped during population:2, {p['back']} of them back; {s['client_starts']} starts) |",
             f"| online (largest seen / at the end) | {s['online_max']} / {s['online_at_end']} |",
             f"| federation.min_available_clients | {p['min_available']} |",
             f"| run completed | {'yes' if s['completed'] else 'NO'} (submit exit {s['submit_rc']})"
             + ("" if s["memory_guard_mib"] is None else
                f"; stopped by the memory guard at {s['memory_guard_mib']} MiB available") + " |",
             f"| steps completed | {s['steps_done']} ({s['train_rounds_logged']} training rounds in rounds.jsonl) |",
             f"| seconds in the steps / wall time from server start | {s['run_seconds']} / {s['wall_s']} |",
             f"| peak server memory (RSS, process family) | {s['peak_server_mib']} MiB |",
             f"| peak clients' memory (RSS, all families together) | {s['peak_clients_mib']} MiB "
             f"(one node's family at most {s['peak_client_node_mib']} MiB) |",
             f"| machine memory in use (total - available) at start / peak | {s['machine_used_start_mib']} / "
             f"{s['machine_used_peak_mib']} MiB (other work on the machine included) |",
             "", "| step | seconds | sent | ok | failed | silent | users |", "|---|---:|---:|---:|---:|---:|---:|"]
    for st in s["steps"]:
        lines.append(f"| {st['step']} | {st['seconds']} | {st['sent']} | {st['ok']} | {st['failed']} | "
                     f"{st['silent']} | {st['users']} |")
    lines += ["", "Events: " + "; ".join(f"{e['t']:.0f} s {e['event']}" for e in s["events"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--out", required=True, help="a new directory: the deployment's files, logs and the table")
    ap.add_argument("--stop", type=int, default=None, help="clients stopped during population:2 (default nodes//6)")
    ap.add_argument("--back", type=int, default=None, help="of those, how many start again (default 3/5 of --stop)")
    ap.add_argument("--population-rounds", type=int, default=2)
    ap.add_argument("--group-rounds", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=900, help="federation.timeout_s of the run")
    ap.add_argument("--limit-s", type=float, default=3600, help="stop the run after this long")
    ap.add_argument("--state", choices=("file", "memory"), default="file",
                    help="the SuperLink's state: SQLite file (the default deployment) or in memory")
    ap.add_argument("--look-every", type=float, default=20, help="seconds between `flwr supernode ls` counts")
    ap.add_argument("--memory-floor-gib", type=float, default=2.0,
                    help="kill the whole fleet when the machine's available memory falls below this")
    args = ap.parse_args(argv)
    if args.nodes < 2:
        raise SystemExit("--nodes must be at least 2")
    p = plan(args.nodes, args.stop, args.back)
    out = Path(args.out).resolve()
    fleet = Fleet(out, args.nodes)
    try:
        with MemoryPeaks(fleet, floor=int(args.memory_floor_gib * 2 ** 30)) as mem:
            happened = drive(fleet, p, args, mem)
    finally:
        fleet.procs.stop_all()
    summary = summarize(fleet, p, happened, mem, fleet.client_starts)
    md = markdown(summary)
    atomic_write_text(out / "load.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "load.md", md)
    print(md)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
