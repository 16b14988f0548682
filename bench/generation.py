"""Personalized generation speed: PROPER's stage-3 model against the bare backbone.

Greedy generation of the same prompts, the same number of new tokens per prompt (min_new_tokens =
max_new_tokens, so no sequence stops early), by:

  bare      the backbone as loaded, no adapters anywhere (a separate copy of the same weights)
  user-uncached  the same, with ProperLinear.keep_weights off: every step re-builds the derived
            weights, as before they were kept (the difference is what keeping them gains)
  user-fused  the same model served with ProperLinear.fuse: the user's parts folded into two kept
            matmuls per layer (adapters.py, "fused serving"); the same sums in another order, so the
            greedy tokens it shares with `user` are counted
  bare-bf16 (reference for the bandwidth bound only) the backbone loaded in bfloat16: no autocast
            cast of the weights at each step; not what the evaluation runs
  user      PROPER's stage-3 model: population LoRA merged into the weights (W_p), k group experts
            with the user-aware router, the user's LoRA and LoRA-aware router on every FFN layer
            (ProperLinear in stage "user", one user's adapter loaded, routed with its e_u); the
            experts cannot be folded into the weights, since the routers weigh them per token

The adapters hold random values of trained-model scale (B != 0; speed does not depend on them),
or, with --run, a real user's adapter from a run directory. On a shared machine absolute speeds
drift, so the variants run interleaved: R repetitions of [bare, user] blocks; the median time of
each gives tokens/s, and the ratio user/bare is the number to compare (target >= 0.9).

The bare backbone is also set against the machine's memory bandwidth: a decoding step has to read
every weight once, so tokens/s cannot exceed batch * bandwidth / weight bytes. The bandwidth is
measured here (a large tensor copy: bytes read + written per second), the bound given for the
weights as they are held (float32) and as bfloat16, and for what autocast moves per step (each
float32 weight read, written as a bfloat16 copy and read again: 8 bytes a parameter).

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

TARGET = 0.9


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | a local HF path")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (prompts generated together)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--step-samples", type=int, default=30, help="interleaved samples of one decoding step")
    ap.add_argument("--float32", action="store_true", help="no bfloat16 autocast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run", default=None, help="a `proper local` run directory: use its first user's adapter")
    ap.add_argument("--no-bf16-reference", dest="bf16_reference", action="store_false",
                    help="leave out the bare-bf16 variant (the backbone held in bfloat16)")
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
    bare16 = load_backbone(args.model, dtype="bfloat16", seed=0)[0] if args.bf16_reference else None
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
    return (bare, bare16), model, tok, emb, targets


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
def generate_once(lm, tok, batch: list[list[int]], new_tokens: int, bf16: bool, ctx=None) -> torch.Tensor:
    """The new tokens [batch, new_tokens] of one greedy generation."""
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
    return out[:, width:]


def fused(model, fn):
    """fn with the model's layers fused (ProperModel.fused) for its duration."""
    def run(*a, **kw):
        with model.fused():
            return fn(*a, **kw)
    return run


def step_fn(lm, tok, batch, bf16: bool, ctx_fn=None, keep: bool = True):
    """A function that runs one decoding step (one new token per row over the prompt's KV cache),
    then drops that token from the cache: the same step every call."""
    from contextlib import nullcontext

    from shared.method.adapters import ProperLinear
    width = max(len(p) for p in batch)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
    mask = (ids != tok.pad_token_id).long()

    def run(**kw):
        ProperLinear.keep_weights = keep
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                    (ctx_fn() if ctx_fn else nullcontext()):
                return lm(**kw)
        finally:
            ProperLinear.keep_weights = True
    first = run(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, nxt = first.past_key_values, first.logits[:, -1:].argmax(-1)
    full = torch.cat([mask, torch.ones_like(nxt)], 1)

    def step():
        run(input_ids=nxt, attention_mask=full, past_key_values=cache, use_cache=True)
        cache.crop(-1)
    return step


def measure_steps(runs: dict, samples: int) -> dict:
    """{variant: (min, median) seconds per step}, the variants interleaved sample by sample."""
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(samples):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def memory_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Bytes per second of a large float32 copy (each byte read once and written once), median."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def bandwidth_lines(bare, res: dict, bw: float) -> list[str]:
    """The bare backbone's tokens/s against batch * bandwidth / bytes read per step."""
    n = sum(p.numel() for p in bare.parameters())  # tied embedding / head counted once
    out = [f"Memory bandwidth (a {256} MiB float32 copy, read + written, 1 thread): {bw / 1e9:.1f} GB/s; "
           f"bare backbone {n / 1e6:.1f} M parameters. Bound = batch x bandwidth / bytes per step.", "",
           "| batch | bare tokens/s | bare-bf16 tokens/s | bound, bf16 weights (2 B/param) | "
           "bound, fp32 weights as held (4 B) | bound, autocast casts (8 B) | bare / bf16 bound | "
           "bare-bf16 / bf16 bound |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, r in res.items():
        bounds = [b * bw / (n * nbytes) for nbytes in (2, 4, 8)]
        b16 = r.get("bare-bf16", (float("nan"),))[0]
        out.append(f"| {b} | {r['bare'][0]:.1f} | {b16:.1f} | " + " | ".join(f"{x:.1f}" for x in bounds) +
                   f" | {r['bare'][0] / bounds[0]:.2f} | {b16 / bounds[0]:.2f} |")
    return out


def measure(args, bares, model, tok, emb, batch_size: int):
    batch = prompts(tok, batch_size)
    bf16 = not args.float32
    e = emb.view(1, -1).expand(len(batch), -1)
    bare, bare16 = bares
    runs = {
        "bare": lambda: generate_once(bare, tok, batch, args.new_tokens, bf16),
        "user": lambda: generate_once(model.lm, tok, batch, args.new_tokens, bf16, ctx=model.users(e)),
    }
    def uncached():
        from shared.method.adapters import ProperLinear
        ProperLinear.keep_weights = False
        try:
            return generate_once(model.lm, tok, batch, args.new_tokens, bf16, ctx=model.users(e))
        finally:
            ProperLinear.keep_weights = True
    runs["user-uncached"] = uncached
    runs["user-fused"] = fused(model, lambda: generate_once(model.lm, tok, batch, args.new_tokens, bf16,
                                                           ctx=model.users(e)))
    if bare16 is not None:
        runs["bare-bf16"] = lambda: generate_once(bare16, tok, batch, args.new_tokens, False)
    first = {}
    for _ in range(max(1, args.warmup)):
        for name, fn in runs.items():
            first[name] = fn()
    # keeping the derived weights must not change a token (bf16 autocast, the real model)
    same = torch.equal(first["user"], first["user-uncached"])
    agree = (first["user-fused"] == first["user"]).float().mean().item()
    # how far each path is from the same model computed in float32 throughout: a greedy token that
    # the two paths disagree on is one where rounding decides, whichever path rounds
    ref = generate_once(model.lm, tok, batch, args.new_tokens, False, ctx=model.users(e)) if bf16 else first["user"]
    agree = (agree, *((first[v] == ref).float().mean().item() for v in ("user", "user-fused")))
    print(f"  batch {batch_size}: user and user-uncached tokens identical: {same}; user-fused shares "
          f"{agree[0]:.1%} of user's tokens; against float32: user {agree[1]:.1%}, user-fused {agree[2]:.1%}",
          flush=True)
    times = {k: [] for k in runs}
    tokens = {}
    for rep in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn().numel()
            times[name].append(time.perf_counter() - t0)
        print(f"  batch {batch_size} rep {rep + 1}/{args.reps}: " +
              "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    out = {k: (tokens[k] / statistics.median(v), statistics.median(v), min(v), max(v)) for k, v in times.items()}
    bare, bare16 = bares
    steps = {"bare": step_fn(bare, tok, batch, bf16),
             "user": step_fn(model.lm, tok, batch, bf16, lambda: model.users(e)),
             "user-uncached": step_fn(model.lm, tok, batch, bf16, lambda: model.users(e), keep=False)}
    steps["user-fused"] = fused(model, step_fn(model.lm, tok, batch, bf16, lambda: model.users(e)))
    return out, (same, agree), measure_steps(steps, args.step_samples)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bares, model, tok, emb, targets = build(args)
    bare = bares[0]
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = ["| batch | variant | tokens/s (median) | s per generate (median, min, max) | / bare |",
            "|---:|---|---:|---|---:|"]
    verdicts, by_batch, identical = [], {}, []
    step_rows = ["| batch | variant | ms per decoding step (min) | (median) | speed / bare (min) |",
                 "|---:|---|---:|---:|---:|"]
    bw = memory_bandwidth()
    for b in [int(x) for x in args.batch.split(",")]:
        res, same, step = measure(args, bares, model, tok, emb, b)
        by_batch[b] = res
        bare_step = step["bare"][0]
        for name, (lo, med) in step.items():
            speed = "" if name == "bare" else f"{bare_step / lo:.3f}"
            step_rows.append(f"| {b} | {name} | {lo * 1e3:.1f} | {med * 1e3:.1f} | {speed} |")
        same, agree = same
        identical.append(f"batch {b}: {'identical' if same else 'DIFFERENT'}, user-fused shares {agree[0]:.1%} of "
                         f"user's greedy tokens; the same user's model in float32 throughout shares {agree[1]:.1%} "
                         f"of user's and {agree[2]:.1%} of user-fused's")
        ratio = res["user"][0] / res["bare"][0]
        fused_ratio = res["user-fused"][0] / res["bare"][0]
        for name in res:
            tps, med, lo, hi = res[name]
            vs_bare = f"{tps / res['bare'][0]:.3f}" if name.startswith("user") else ""
            rows.append(f"| {b} | {name} | {tps:.1f} | {med:.3f}, {lo:.3f}, {hi:.3f} | {vs_bare} |")
        verdicts.append(f"batch {b}: user {ratio:.3f} ({'ok' if ratio >= TARGET else 'BELOW'} target {TARGET}), "
                        f"user-fused {fused_ratio:.3f} ({'ok' if fused_ratio >= TARGET else 'BELOW'} target)")
    cfg = bare.config
    text = "\n".join([
        f"Model {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); adapters on "
        f"{', '.join(targets)}: population LoRA merged, k = {model.k} experts (r = {model.layers()[0][1].r_group}) "
        f"with the user-aware and LoRA-aware routers, user LoRA r = {model.layers()[0][1].r_user}"
        f"{' from ' + args.run if args.run else ' (random values of trained scale)'}; greedy, "
        f"{args.new_tokens} new tokens per prompt; {'float32' if args.float32 else 'bfloat16 autocast'}.",
        f"Machine: {machine()}.",
        f"Timing: {args.warmup} warm-up, then {args.reps} repetitions of [{', '.join(by_batch[b])}] per batch "
        f"size; medians; "
        f"{time.perf_counter() - t0:.0f} s in all.",
        "",
        *rows,
        "",
        "Personalized over bare tokens/s: " + "; ".join(verdicts) + ".",
        "Tokens of user against user-uncached (the kept weights against none): " + "; ".join(identical) + ".",
        "",
        f"One decoding step (one new token per row over the prompt's KV cache, dropped again), "
        f"{args.step_samples} samples of each variant interleaved; the minimum is the least disturbed by "
        "other processes:",
        "",
        *step_rows,
        "",
        *bandwidth_lines(bare, by_batch, bw),
    ])
    print()
    print(text)
    if not args.no_append:
        command = "python -m bench.generation " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("appended to", append_result("d. personalized generation vs the bare backbone", command, text))


if __name__ == "__main__":
    main()
