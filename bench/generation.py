"""Personalized generation speed: PROPER's stage-3 model against the bare backbone.

Greedy generation of the same prompts, the same number of new tokens per prompt (min_new_tokens =
max_new_tokens, so no sequence stops early), by:

  bare      the backbone as loaded, no adapters anywhere (a separate copy of the same weights)
  user      PROPER's stage-3 model: population LoRA merged into the weights (W_p), k group experts
            with the user-aware router, the user's LoRA and LoRA-aware router on every FFN layer
            (ProperLinear in stage "user", one user's adapter loaded, routed with its e_u); the
            experts cannot be folded into the weights, since the routers weigh them per token

The adapters hold random values of trained-model scale (B != 0; speed does not depend on them),
or, with --run, a real user's adapter from a run directory. On a shared machine absolute speeds
drift, so the variants run interleaved: R repetitions of [bare, user] blocks; the median time of
each gives tokens/s, and the ratio user/bare is the number to compare (target >= 0.75).

    python -m bench.generation                      # tiny model
    python -m bench.generation --model embedded     # SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from bench.common import append_result, machine

TARGET = 0.75


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | a local HF path")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (prompts generated together)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--float32", action="store_true", help="no bfloat16 autocast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run", default=None, help="a `proper local` run directory: use its first user's adapter")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/results/bench.md")
    return ap.parse_args(argv)


def prompts(tokenizer, n: int) -> list[list[int]]:
    """LaMP-2 style prompts (compact template) from synthetic users: realistic lengths."""
    import tempfile

    from shared.data.encode import encode_prompt
    from shared.data.lamp import apply_template, load_lamp
    from shared.data.synthetic import write_synthetic_lamp
    with tempfile.TemporaryDirectory() as d:
        write_synthetic_lamp(d, n_users=max(n, 2), seed=0)
        spec, users = load_lamp(d)
        users = apply_template(users, spec.name, "compact")
    return [encode_prompt(tokenizer, u.test[0].input, 160) for u in users[:n]]


def build(args):
    from shared.method.model import ProperModel
    from shared.runtime.backbone import load_backbone
    from shared.runtime.targets import find_target_modules
    bare, tok = load_backbone(args.model, seed=0)
    lm, _ = load_backbone(args.model, seed=0)
    targets = find_target_modules(lm, None)
    model = ProperModel(lm, targets, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in model.layers():  # adapters of trained-model scale
            layer.lora_B.normal_(0, 0.01, generator=g)
            layer.expert_B.normal_(0, 0.01, generator=g)
            layer.user_B.normal_(0, 0.01, generator=g)
            layer.router_g.normal_(0, 0.1, generator=g)
    model.merge_population()
    emb = torch.randn(model.d_user, generator=g)
    if args.run:
        emb = _load_user(model, args.run)
    model.set_stage("user")
    return bare, model, tok, emb, targets


def _load_user(model, run_dir):
    """The first user's adapter and embedding from a `proper local` run (same backbone and config)."""
    from pathlib import Path

    from shared.runtime.persist import import_peft_adapter, load_group, load_tensors
    run = Path(run_dir)
    state = run / "client_state"
    model.unmerge_population()
    import_peft_adapter(model, "population", run / "population_lora")
    model.merge_population()
    load_group(model, run / "group.safetensors")
    first = sorted(state.glob("*.user"))[0]
    import_peft_adapter(model, "user", first)
    prefix = first.name[: -len(".user")]
    router, _ = load_tensors(state / f"{prefix}.router.safetensors")
    s = model.part_state("user")
    s.update(router)
    model.load_part_state("user", s)
    return load_tensors(state / f"{prefix}.embedding.safetensors")[0]["e_u"]


@torch.no_grad()
def generate_once(lm, tok, batch: list[list[int]], new_tokens: int, bf16: bool, ctx=None) -> int:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    from contextlib import nullcontext
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), (ctx or nullcontext()):
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return int((out.shape[1] - width) * len(batch))


def measure(args, bare, model, tok, emb, batch_size: int):
    batch = prompts(tok, batch_size)
    bf16 = not args.float32
    e = emb.view(1, -1).expand(len(batch), -1)
    runs = {
        "bare": lambda: generate_once(bare, tok, batch, args.new_tokens, bf16),
        "user": lambda: generate_once(model.lm, tok, batch, args.new_tokens, bf16, ctx=model.users(e)),
    }
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    tokens = {}
    for rep in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
        print(f"  batch {batch_size} rep {rep + 1}/{args.reps}: " +
              "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return {k: (tokens[k] / statistics.median(v), statistics.median(v), min(v), max(v)) for k, v in times.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bare, model, tok, emb, targets = build(args)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = ["| batch | variant | tokens/s (median) | s per generate (median, min, max) | user / bare |",
            "|---:|---|---:|---|---:|"]
    verdicts = []
    for b in [int(x) for x in args.batch.split(",")]:
        res = measure(args, bare, model, tok, emb, b)
        ratio = res["user"][0] / res["bare"][0]
        for name in ("bare", "user"):
            tps, med, lo, hi = res[name]
            rows.append(f"| {b} | {name} | {tps:.1f} | {med:.3f}, {lo:.3f}, {hi:.3f} | "
                        f"{'' if name == 'bare' else f'{ratio:.3f}'} |")
        verdicts.append(f"batch {b}: {ratio:.3f} ({'ok' if ratio >= TARGET else 'BELOW'} target {TARGET})")
    cfg = bare.config
    text = "\n".join([
        f"Model {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); adapters on "
        f"{', '.join(targets)}: population LoRA merged, k = {model.k} experts (r = {model.layers()[0][1].r_group}) "
        f"with the user-aware and LoRA-aware routers, user LoRA r = {model.layers()[0][1].r_user}"
        f"{' from ' + args.run if args.run else ' (random values of trained scale)'}; greedy, "
        f"{args.new_tokens} new tokens per prompt; {'float32' if args.float32 else 'bfloat16 autocast'}.",
        f"Machine: {machine()}.",
        f"Timing: {args.warmup} warm-up, then {args.reps} repetitions of [bare, user]; medians; "
        f"{time.perf_counter() - t0:.0f} s in all.",
        "",
        *rows,
        "",
        "Personalized over bare tokens/s: " + "; ".join(verdicts) + ".",
    ])
    print()
    print(text)
    if not args.no_append:
        command = "python -m bench.generation " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("appended to", append_result("d. personalized generation vs the bare backbone", command, text))


if __name__ == "__main__":
    main()
