"""The device check of issue 32: PROPER's client computation on one GPU, in one table.

    python -m bench.gpu --device cuda --out $OUT/gpu.md            # a lent H100/H200, at most 8 minutes
    python -m bench.gpu --device cpu --dry                         # the CPU dry run (under 2 minutes)

Parts (--parts, default all):
  train   training step tokens/s of stages 1, 2 and 3 (ProperModel, float32 master weights, bf16 autocast
          where the device has it) against a plain PEFT LoRA step (r=8 on the same FFN layers, same
          autocast), for SmolLM2-135M's architecture and a Qwen2-1.5B-shaped model, random weights
  decode  personalized (one user's stage-3 model, fused serving path) against bare (the backbone alone)
          greedy decoding tokens/s at batch 1, 8 and 32
  memory  peak GPU memory of one 1.5B-shaped backbone serving 1, 8 and 64 virtual clients, each row of
          the batch with its own user's parts (ProperModel.user_parts): the memory a client adds
  local   the tiny model's 16-user run (`proper local`: the three stages and their evaluation) on the
          device against the same run on the CPU, the final shared parameters compared
  serve   `proper generate` cold start (sim.cli in a fresh process) on a run directory (--run)

What each part needs: train, decode and memory import torch, transformers, peft and shared/method
alone (no flwr, Ray or omegaconf: what the lent machine has). local and serve need the project's
config layer: omegaconf travels as a copied package (--deps DIR on PYTHONPATH; the README's GPU section
says how), flwr and Ray are not needed since `proper local` runs the clients' stage code without them.
Why not the federated in-process engine: it imports flwr, whose dependencies (uv, fastapi, sqlalchemy,
cryptography...) are not on the machine and too many to carry; the clients' computation is the same
stage code either way (tests/test_federation.py checks local against federated on the CPU).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

# before torch loads OpenMP: waiting threads sleep rather than spin (sim/cli.py says why; a CPU dry run on a
# shared machine was many times slower without it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # SmolLM2-135M(-Instruct) and Qwen2-1.5B, from their config.json
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=8192)),
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                 tie_word_embeddings=True, max_position_embeddings=32768)),
}


def shape(name: str, dry: bool) -> tuple[str, dict]:
    family, kw = SHAPES[name]
    if dry:  # the same families, small enough for a CPU dry run
        kw = dict(kw, hidden_size=kw["hidden_size"] // 4, intermediate_size=kw["intermediate_size"] // 4,
                  num_hidden_layers=2, vocab_size=4096)
        kw["num_attention_heads"] = kw["num_attention_heads"] // 3 or 1
        kw["num_key_value_heads"] = 1
    return family, kw


def build_lm(name: str, device: str, dry: bool, seed: int = 0):
    """A random model of that shape, built on the device (float32)."""
    import transformers as hf
    family, kw = shape(name, dry)
    config_cls, model_cls = {"llama": (hf.LlamaConfig, hf.LlamaForCausalLM),
                             "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    with torch.device(device):
        lm = model_cls(config_cls(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lm.eval().requires_grad_(False)
    return lm


def proper_model(lm, device: str):
    from shared.method.model import ProperModel
    from shared.runtime.targets import find_target_modules
    # the adapters are initialised on the CPU (seeded CPU generator, as on any client), then moved
    with torch.device("cpu"):
        model = ProperModel(lm, find_target_modules(lm), seed=0)
    return model.to(device)


def autocast(device: str):
    bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()


def sync(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tokens_per_s(step, n_tokens: int, device: str, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return n_tokens * steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- train
def train_rows(name: str, device: str, dry: bool) -> list[tuple[str, str]]:
    from peft import LoraConfig, get_peft_model

    from shared.runtime.targets import find_target_modules
    batch, length, warmup, steps = (2, 32, 1, 1) if dry else (8, 256, 3, 10)
    ids = torch.randint(3, shape(name, dry)[1]["vocab_size"], (batch, length), device=device)

    def runner(model_fn, params, emb=None):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with autocast(device):
                loss = model_fn(emb).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    lm = build_lm(name, device, dry)
    plain = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=find_target_modules(lm)))
    base = tokens_per_s(runner(lambda e: plain(input_ids=ids, labels=ids),
                               [p for p in plain.parameters() if p.requires_grad]), ids.numel(), device, warmup, steps)
    plain = lm = None   # one model on the device at a time
    empty_cache(device)
    model = proper_model(build_lm(name, device, dry), device)
    rows = [(f"{name}: plain PEFT LoRA step (r=8)", f"{base:,.0f} tokens/s")]
    for number, stage in enumerate(("population", "group", "user"), 1):
        if stage == "group":
            model.merge_population()
        model.set_stage(stage, train=True)
        params, emb = model.trainable_parameters(), None
        if stage != "population":
            emb = torch.nn.Parameter(torch.randn(batch, model.d_user, device=device))
            params = params + [emb]
        rate = tokens_per_s(runner(lambda e, m=model: m(ids, user_emb=e, labels=ids), params, emb),
                            ids.numel(), device, warmup, steps)
        rows.append((f"{name}: stage {number} ({stage}) step", f"{rate:,.0f} tokens/s ({rate / base:.2f}x PEFT)"))
    model = None
    empty_cache(device)
    return rows


def empty_cache(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- decode
def decode_rows(name: str, device: str, dry: bool) -> list[tuple[str, str]]:
    new, steps = (4, 1) if dry else (64, 3)
    model = proper_model(build_lm(name, device, dry), device)
    randomize_user(model)

    def decode(ids):
        with torch.no_grad(), autocast(device):
            model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)

    batches = {b: torch.randint(3, shape(name, dry)[1]["vocab_size"], (b, 16), device=device) for b in (1, 8, 32)}
    model.set_stage("base")   # the backbone alone, before the population LoRA is merged into it
    bare = {b: tokens_per_s(lambda ids=ids: decode(ids), b * new, device, 1, steps) for b, ids in batches.items()}
    model.merge_population()
    model.set_stage("user")
    rows = []
    for b, ids in batches.items():
        with model.users(torch.randn(1, model.d_user, device=device).expand(b, -1)), model.fused(True):
            mine = tokens_per_s(lambda ids=ids: decode(ids), b * new, device, 1, steps)
        rows.append((f"{name}: decoding {new} tokens, batch {b}",
                     f"personalized {mine:,.0f} / bare {bare[b]:,.0f} tokens/s ({mine / bare[b]:.2f}x)"))
    model = None
    empty_cache(device)
    return rows


@torch.no_grad()
def randomize_user(model, seed: int = 1):
    """Trained-looking parts (random, small), so no path is skipped for being zero."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in model.layers():
        for part in ("population", "group", "user"):
            for pname in layer.PARTS[part]:
                p = getattr(layer, pname)
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device))


# ---------------------------------------------------------------- memory
def memory_rows(device: str, dry: bool) -> list[tuple[str, str]]:
    cuda = torch.device(device).type == "cuda"
    name = "qwen2-1.5b"
    model = proper_model(build_lm(name, device, dry), device)
    randomize_user(model)
    model.merge_population()
    model.set_stage("user")
    one_user = model.part_state("user")
    peaks = {}
    for clients in (1, 8, 64):
        empty_cache(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        parts = [{k: v.clone() for k, v in one_user.items()} for _ in range(clients)]  # each client's private part
        ids = torch.randint(3, 1000, (clients, 32), device=device)
        rows = torch.arange(clients, device=device)
        with torch.no_grad(), autocast(device), model.user_parts(parts), \
                model.users(torch.randn(clients, model.d_user, device=device), rows=rows):
            model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)
        peaks[clients] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        parts = None
    part_mib = sum(v.numel() * v.element_size() for v in one_user.values()) / 2**20
    out = []
    for clients, peak in peaks.items():
        out.append((f"{name}: one backbone serving {clients} virtual clients (a row each)",
                    f"peak {peak:.2f} GiB" if peak is not None else
                    f"n/a on the CPU (process max RSS {max_rss_gib():.2f} GiB)"))
    if cuda:
        added = (peaks[64] - peaks[1]) / 63 * 1024
        out.append((f"{name}: GPU memory a client adds",
                    f"{added:.1f} MiB (its user part: {part_mib:.1f} MiB, the rest its rows' activations)"))
    else:
        out.append((f"{name}: a client's user part (LoRA + LoRA-aware router)", f"{part_mib:.2f} MiB"))
    model = None
    return out


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------- local (project needed)
LOCAL = """
import sys, torch
from safetensors.torch import save_file
from shared.runtime.config import load_config
from sim.local import run_local
from client.model import get_model
cfg = load_config("tiny", sys.argv[2:])
run_local(cfg, __import__("pathlib").Path(sys.argv[1]))
model = get_model(cfg)[0]
print("computed on", next(model.parameters()).device)
save_file({k: v.float().cpu().contiguous() for k, v in model.state_dict().items() if any(
    p in k for p in ("lora_", "expert_", "router_", "user_"))}, sys.argv[1] + "/params.safetensors")
"""


def local_rows(device: str, dry: bool, deps: str | None) -> list[tuple[str, str]]:
    from safetensors.torch import load_file
    users = 4 if dry else 16
    over = [f"data.synthetic.n_users={users}", "eval.stages=[user]"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), deps, os.environ.get("PYTHONPATH"))
                                                      if p), TOKENIZERS_PARALLELISM="false")
    out, params, seconds, where = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in dict.fromkeys((device, "cpu")):
            run = Path(tmp) / side
            side_env = dict(env, **({"CUDA_VISIBLE_DEVICES": ""} if side == "cpu" else {}))
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", LOCAL, str(run), *over], env=side_env, cwd=ROOT,
                                  capture_output=True, text=True)
            seconds[side] = time.perf_counter() - t0
            if done.returncode:
                return [("tiny model, local run", f"failed on {side}: {done.stderr.strip().splitlines()[-1:]}")]
            where[side] = next((line.split()[-1] for line in done.stdout.splitlines()
                                if line.startswith("computed")), "?")
            params[side] = load_file(str(run / "params.safetensors"))
    for side in params:
        out[side] = (f"tiny model, {users}-user `proper local` run with `{side}` allowed",
                     f"{seconds[side]:.0f} s, computed on {where[side]}")
    rows = list(out.values())
    if len(params) == 2:
        diff = max((params[device][k] - params["cpu"][k]).abs().max().item() for k in params["cpu"])
        tol = 1e-2
        rows.append(("tiny model: largest parameter difference, device against CPU",
                     f"{diff:.2e} ({'within' if diff <= tol else 'OVER'} the tolerance {tol:g}: bf16/TF32 "
                     "on the device against float32 on the CPU)"))
    return rows


def serve_rows(run: str, user: str, deps: str | None) -> list[tuple[str, str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), deps, os.environ.get("PYTHONPATH"))
                                                      if p))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sim.cli", "generate", run, "--user", user, "--prompt",
                           "a film about a heist", "--max-new-tokens", "8"], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    dt = time.perf_counter() - t0
    answer = done.stdout.strip().replace("\n", " ")[:40] if not done.returncode else done.stderr.strip()[-200:]
    return [("`proper generate` cold, one prompt, 8 new tokens", f"{dt:.1f} s ({answer!r})")]


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    from bench.common import machine
    return f"CPU: {machine()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry", action="store_true", help="small shapes and few steps: a CPU check of the script")
    p.add_argument("--parts", default="train,decode,memory,local", help="comma-separated: train,decode,memory,"
                                                                       "local,serve")
    p.add_argument("--deps", default=None, help="a directory of carried packages (omegaconf) for local and serve")
    p.add_argument("--run", default=None, help="serve: a run directory")
    p.add_argument("--user", default="u0000", help="serve: a user of that run")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    command = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(command)
    if args.deps:
        sys.path.insert(0, args.deps)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    rows = []
    for part in parts:
        start = time.perf_counter()
        if part == "train":
            for name in SHAPES:
                rows += train_rows(name, args.device, args.dry)
        elif part == "decode":
            for name in SHAPES:
                rows += decode_rows(name, args.device, args.dry)
        elif part == "memory":
            rows += memory_rows(args.device, args.dry)
        elif part == "local":
            rows += local_rows(args.device, args.dry, args.deps)
        elif part == "serve":
            rows += serve_rows(args.run, args.user, args.deps)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"# {part}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    title = (f"device: {device_name(args.device)}; torch {torch.__version__}"
             f"{'; DRY RUN (small shapes, few steps: not a measurement)' if args.dry else ''}")
    table = "\n".join([title, "", "| what | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows),
                       "", f"({time.perf_counter() - t0:.0f} s; `python -m bench.gpu {' '.join(command)}`)"])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
