"""`proper generate` cold: one prompt answered by a fresh process, against what any such process pays
before it can do anything (Python, torch and transformers imported, the Llama classes loaded).

    python -m bench.serve_cold RUN --user U [--repeats 5] [--out DIR]

The two commands alternate in fresh processes, `--repeats` times each, so a busy machine slows both
alike; the table gives the median wall and CPU seconds of each and what serving adds over the floor
(the backbone read, the adapters built and loaded, the population merge, the user's parts, the
decoding). Results: docs/results/bench.md, "proper generate cold".
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine
from shared.runtime.persist import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ("import torch, transformers, client.serving; "
         "from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM")


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its stdout) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished run directory (proper or oppu) of the embedded model")
    ap.add_argument("--user", required=True)
    ap.add_argument("--prompt", default="Which tag fits this movie: a boy and his dog travel west")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for serve_cold.md")
    args = ap.parse_args(argv)
    commands = {
        "import floor (torch, transformers, the Llama classes)": [sys.executable, "-c", FLOOR],
        "`proper generate`, one prompt": [sys.executable, "-m", "sim.cli", "generate", args.run, "--user",
                                          args.user, "--prompt", args.prompt, "--max-new-tokens",
                                          str(args.max_new_tokens)],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    answer = ""
    for i in range(args.repeats):
        for name, cmd in commands.items():
            wall, cpu, out = timed(cmd)
            times[name].append((wall, cpu))
            answer = out or answer
            print(f"{i + 1}/{args.repeats} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    med = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}
    (floor_w, floor_c), (gen_w, gen_c) = med.values()
    lines = [f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end",
             f"run: {args.run}, user {args.user}, {args.max_new_tokens} new tokens, answer {answer!r}",
             "", f"| command (median of {args.repeats}, alternating) | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {name} | {w:.2f} | {c:.2f} |" for name, (w, c) in med.items()]
    lines += [f"| what serving adds over the floor | {gen_w - floor_w:.2f} | {gen_c - floor_c:.2f} |",
              f"| ratio generate / floor | {gen_w / floor_w:.2f}x | {gen_c / floor_c:.2f}x |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "serve_cold.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
