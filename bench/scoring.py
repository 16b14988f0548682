"""Label scoring (eval.mode=score) with every label packed in one row per prompt against one padded
row per label, on the embedded SmolLM2-135M and real LaMP-2 prompts: the same log-probabilities
(max difference printed), the seconds side by side.

Both paths share the prompt's KV cache (shared/evaluation/evaluate.py label_logprobs). The rows path
copies that cache once per label and runs 15 rows padded to the longest label (6 tokens for LaMP-2);
the packed path runs the labels' 40 tokens in one row behind a block-causal mask. Interleaved
repetitions, medians, after a warm-up.

    python -m bench.scoring [--threads 1] [--reps 5] [--out docs/results/bench.md]
"""
from __future__ import annotations

import shlex
import statistics
import sys
import time

import torch

from bench.common import append_result, machine, timing_args
from shared.data.encode import encode_prompt
from shared.evaluation.evaluate import label_logprobs
from shared.runtime.precision import use_bf16


def main(argv=None) -> int:
    args = timing_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(args.threads)
    from client.data import all_users
    from client.model import build_model
    from shared.runtime.config import load_config
    cfg = load_config("lamp2_quick", ["data.max_users=8"])
    model, tok = build_model(cfg)
    spec, users = all_users(cfg)
    model.set_stage("population")
    bf16 = use_bf16(cfg.train.bf16)
    exs = [ex for u in users for ex in u.val]
    prompts = [encode_prompt(tok, ex.input, cfg.train.max_len, None) for ex in exs]
    rows = []
    for b in (1, 2, 8):
        def run(pack, b=b):
            return label_logprobs(model, tok, prompts, spec.labels, None, bf16=bf16, batch_size=b, pack=pack)
        ref, new = run(False), run(None)
        diff = float((ref - new).abs().max())
        same = bool((ref.argmax(1) == new.argmax(1)).all())
        t_rows, t_pack = [], []
        for _ in range(args.reps):
            for pack, out in ((False, t_rows), (None, t_pack)):
                t = time.perf_counter()
                run(pack)
                out.append(time.perf_counter() - t)
        r, p = statistics.median(t_rows), statistics.median(t_pack)
        rows.append((b, r, p, diff, same))
        print(f"batch {b}: rows {r:.2f} s, packed {p:.2f} s, rows/packed {r / p:.2f}, max |diff| {diff:.2e}, "
              f"same answers {same}", flush=True)
    body = [f"Machine: {machine()}; {'bf16 autocast' if bf16 else 'float32'} (train.bf16=auto).",
            f"{len(prompts)} LaMP-2 val prompts of the sample's first 8 users (the population stage at its start), "
            f"{len(spec.labels)} labels; medians of {args.reps} interleaved repetitions.", "",
            "| prompts per batch | rows s | packed s | rows s / packed s | max abs. difference of log-probabilities "
            "| same answers |", "|---:|---:|---:|---:|---:|---|"]
    body += [f"| {b} | {r:.2f} | {p:.2f} | {r / p:.2f} | {d:.1e} | {s} |" for b, r, p, d, s in rows]
    text = "\n".join(body)
    print(text)
    if args.out:
        append_result("Label scoring: labels packed in one row against one row per label",
                      "python -m bench.scoring " + shlex.join(sys.argv[1:]), text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
