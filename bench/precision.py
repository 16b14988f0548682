"""bf16 autocast against float32 on this CPU, at the shapes the stages run: what `train.bf16: auto`
decides (shared/runtime/precision.py measures one layer; this measures the whole model).

  train   one population-stage training step (forward, answer loss, backward) on the embedded
          SmolLM2-135M with its LoRA, batch B x T random tokens, the last 3 learned
  score   scoring LaMP-2's 15 labels after B prompts of T tokens (label_logprobs: the evaluation)

Each pair is measured interleaved (float32, bf16, float32, ...) after a warm-up, medians over the
repetitions, so a machine shared with other work loads both sides alike; the ratio float32 / bf16
seconds is the number to read (> 1: bf16 is faster). The calibration `auto` runs is printed beside.

    python -m bench.precision [--threads 1] [--reps 5] [--out docs/results/bench_precision.md]
"""
from __future__ import annotations

import shlex
import statistics
import sys
import time

import torch

from bench.common import append_result, machine, timing_args
from shared.evaluation.evaluate import label_logprobs
from shared.method.losses import answer_loss
from shared.runtime.precision import autocast, cpu_has_bf16, measure_cpu_bf16

LABELS = ["sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
          "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story"]


def median_pair(fn, reps: int) -> tuple[float, float]:
    """(float32 s, bf16 s): medians of fn(bf16) over `reps` interleaved calls each, after one warm-up each."""
    fn(False), fn(True)
    t32, t16 = [], []
    for _ in range(reps):
        for bf16, out in ((False, t32), (True, t16)):
            t = time.perf_counter()
            fn(bf16)
            out.append(time.perf_counter() - t)
    return statistics.median(t32), statistics.median(t16)


def main(argv=None) -> int:
    args = timing_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(args.threads)
    from client.model import build_model
    from shared.runtime.config import load_config
    cfg = load_config("lamp2_quick", [])
    model, tok = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    rows = []

    def train_step(B, T):
        ids = torch.randint(100, 20000, (B, T), generator=g)
        mask = torch.ones_like(ids)
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]

        def fn(bf16):
            model.set_stage("population", train=True)
            with autocast({"bf16": bf16}):
                loss = answer_loss(model.lm, ids, mask, labels)
            loss.backward()
            model.lm.zero_grad(set_to_none=True)
        return fn

    def score(B, T):
        prompts = [torch.randint(100, 20000, (T,), generator=g).tolist() for _ in range(B)]

        def fn(bf16):
            model.set_stage("population")
            label_logprobs(model, tok, prompts, LABELS, None, bf16=bf16, batch_size=B)
        return fn

    cases = [("train", "2 x 70 (the main job's batch)", train_step(2, 70)),
             ("train", "8 x 128", train_step(8, 128)),
             ("score", "1 prompt x 70 (a one-user client's question)", score(1, 70)),
             ("score", "8 prompts x 70", score(8, 70))]
    for kind, shape, fn in cases:
        f32, b16 = median_pair(fn, args.reps)
        rows.append((kind, shape, f32, b16))
        print(f"{kind} {shape}: float32 {f32:.3f} s, bf16 {b16:.3f} s, float32/bf16 {f32 / b16:.2f}", flush=True)
    cal = measure_cpu_bf16()
    body = [f"Machine: {machine()}; native bf16 kernels (oneDNN): {cpu_has_bf16()}.",
            f"Medians of {args.reps} interleaved repetitions after a warm-up; the embedded SmolLM2-135M with "
            "lamp2_quick's adapters.", "",
            "| what | shape | float32 s | bf16 autocast s | float32 s / bf16 s (> 1: bf16 faster) |",
            "|---|---|---:|---:|---:|"]
    body += [f"| {k} | {s} | {a:.3f} | {b:.3f} | {a / b:.2f} |" for k, s, a, b in rows]
    body += ["", f"`train.bf16: auto`'s own measurement (one FFN layer, shared/runtime/precision.py "
             f"measure_cpu_bf16): float32 {cal['float32_s'] * 1e3:.1f} ms, bf16 {cal['bf16_s'] * 1e3:.1f} ms, "
             f"ratio {cal['float32_s'] / cal['bf16_s']:.2f}."]
    text = "\n".join(body)
    print(text)
    if args.out:
        append_result("bf16 autocast against float32", "python -m bench.precision " + shlex.join(sys.argv[1:]),
                      text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
