"""Training throughput of PROPER's stages against a plain single-LoRA PEFT step.

Three training steps on the same backbone weights and the same batch:

  a  plain PEFT: one LoRA (r=8) on gate/up/down_proj, AdamW, forward + backward + step
  b  PROPER stage 2 (k experts + user-aware router + user embeddings; LM loss + constraint
     loss over the users' routing mixtures), one batch exactly as `train_group` does it
  c  PROPER stage 3 (user LoRA + LoRA-aware router; one user's batch), as `train_user` does it

On a machine shared with other processes absolute speeds drift, so the variants are measured
interleaved in one run: warm-up steps, then R repetitions of [a, b, c] blocks of N steps each;
the median wall time per step of each variant gives its tokens/s, and the ratios b/a and c/a
are the numbers to compare across machines (target >= 0.85). The CPU time per step is printed
beside it: when other processes take the cores, wall time swells with every synchronisation
point of torch's threads while CPU time barely moves, so the two tell work from contention.

    python -m bench.throughput --model embedded --out docs/results/bench_throughput.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.method.model import ProperModel
from shared.method.stages import answer_loss, constraint_loss, user_mixtures
from shared.runtime.backbone import load_backbone
from shared.runtime.precision import autocast
from shared.runtime.targets import find_target_modules

TARGET_RATIO = 0.85


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | a local HF path")
    ap.add_argument("--steps", type=int, default=2, help="N: steps per block")
    ap.add_argument("--reps", type=int, default=10, help="R: repetitions of the [a, b, c] blocks")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--answer", type=int, default=8,
                    help="labelled (answer) tokens at the end of each row, the prompt masked as in "
                         "training; 0 = every token labelled")
    ap.add_argument("--users", type=int, default=4, help="distinct users in the stage-2 batch")
    ap.add_argument("--k", type=int, default=5, help="group experts")
    ap.add_argument("--float32", action="store_true", help="no bfloat16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write a markdown snippet here (atomically)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- the three variants
class Variant:
    """One kind of training step; `step()` runs one full optimizer step on the fixed batch."""
    name = ""
    label = ""

    def activate(self):
        """Put the shared model into this variant's training state (cheap; before each block)."""


class PeftStep(Variant):
    name, label = "a", "PEFT LoRA r=8 (baseline)"

    def __init__(self, lm, targets, batch, cfg):
        from peft import LoraConfig, get_peft_model
        self.model = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=targets))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.batch, self.cfg = batch, cfg

    def step(self):
        ids, mask, labels, _ = self.batch
        with autocast(self.cfg):  # the same loss code as b and c: only the adapters differ
            loss = answer_loss(self.model.get_base_model(), ids, mask, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        loss.item()


class GroupStep(Variant):
    """The body of `train_group`'s batch loop (final-epoch statistics included)."""
    name, label = "b", "PROPER stage 2 (group)"

    def __init__(self, model: ProperModel, batch, cfg, n_users: int, seed: int):
        self.model, self.batch, self.cfg = model, batch, cfg
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(n_users, model.d_user, generator=g))
        n_layers = len(model.layer_names)
        # Previous-round mixtures of other users, as the server would send them.
        self.others = torch.softmax(torch.randn(2 * n_users, n_layers, model.k, generator=g), -1)
        self.mass = torch.zeros(n_layers, model.k)
        self.mix_sum = torch.zeros(n_users, n_layers, model.k)
        self.mix_tok = torch.zeros(n_users)
        model.set_stage("group", train=True)
        self.params = model.trainable_parameters() + [self.emb]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def activate(self):
        self.model.set_stage("group", train=True)

    def step(self):
        ids, mask, labels, uidx = self.batch
        model, emb = self.model, self.emb
        with autocast(self.cfg), model.users(emb[uidx], record=True) as ctx:
            lm = answer_loss(model.lm, ids, mask, labels)
        p, uniq, ntok = user_mixtures(ctx.betas, mask, uidx)
        con = constraint_loss(p, self.others)
        loss = lm + 0.1 * con
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        lm.item(), con.item()
        with torch.no_grad():
            pd = p.detach().float()
            self.mix_sum.index_add_(0, uniq, pd * ntok.view(-1, 1, 1).float())
            self.mix_tok.index_add_(0, uniq, ntok.float())
            self.mass += (pd * ntok.view(-1, 1, 1).float()).sum(0)
        ctx.betas.clear()


class UserStep(Variant):
    """The body of `train_user`'s batch loop, for one user."""
    name, label = "c", "PROPER stage 3 (user)"

    def __init__(self, model: ProperModel, batch, cfg, seed: int):
        self.model, self.batch, self.cfg = model, batch, cfg
        g = torch.Generator().manual_seed(seed + 1)
        self.e = torch.randn(1, model.d_user, generator=g)
        model.reset_part("user", seed=seed)
        model.set_stage("user", train=True)
        self.params = model.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def activate(self):
        self.model.set_stage("user", train=True)

    def step(self):
        ids, mask, labels, _ = self.batch
        model = self.model
        with autocast(self.cfg), model.users(self.e.expand(len(ids), -1)):
            loss = answer_loss(model.lm, ids, mask, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        loss.item()


# ---------------------------------------------------------------- set-up
def make_batch(vocab: int, batch: int, seq: int, answer: int, n_users: int, seed: int):
    """Random token ids, no padding; the last `answer` tokens of each row are learned (all when
    0), as `encode_example` masks the prompt; rows spread over n_users users."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if 0 < answer < seq:
        labels[:, :seq - answer] = -100
    users = torch.arange(batch) % max(1, n_users)
    return ids, mask, labels, users


def make_proper(args, targets) -> ProperModel:
    """A ProperModel on a fresh copy of the backbone, with a (random) population LoRA merged."""
    lm, _ = load_backbone(args.model, seed=args.seed)
    model = ProperModel(lm, targets, k=args.k, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 7)
    with torch.no_grad():
        for _, layer in model.layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    model.merge_population()
    return model


def build(args):
    lm, _ = load_backbone(args.model, seed=args.seed)
    targets = find_target_modules(lm)
    cfg = {"bf16": not args.float32}
    batch = make_batch(lm.config.vocab_size, args.batch, args.seq, args.answer, args.users, args.seed)
    one_user = (*batch[:3], torch.zeros(args.batch, dtype=torch.long))
    proper = make_proper(args, targets)
    variants = [PeftStep(lm, targets, batch, cfg),
                GroupStep(proper, batch, cfg, args.users, args.seed),
                UserStep(proper, one_user, cfg, args.seed)]
    return variants, targets, lm.config


# ---------------------------------------------------------------- measurement
@dataclass
class Timings:
    """Per-step seconds of each variant: wall clock, and CPU time of this process (all threads).

    Wall time is the throughput; CPU time is what the step cost this process, far less
    disturbed by other processes taking the cores (it still counts threads spinning while
    they wait for each other), so the two ratios together tell work from contention.
    """
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def measure(variants, steps: int, reps: int, warmup: int, log=print) -> Timings:
    """Warm-up, then `reps` interleaved [a, b, c] blocks of `steps` steps each."""
    for v in variants:
        v.activate()
        for _ in range(warmup):
            v.step()
    t = Timings({v.name: [] for v in variants}, {v.name: [] for v in variants})
    for rep in range(reps):
        for v in variants:
            v.activate()
            for _ in range(steps):
                w0, c0 = time.perf_counter(), time.process_time()
                v.step()
                t.wall[v.name].append(time.perf_counter() - w0)
                t.cpu[v.name].append(time.process_time() - c0)
        log(f"  rep {rep + 1}/{reps}: " + "  ".join(
            f"{v.name} {statistics.median(t.wall[v.name][-steps:]):.2f}s" for v in variants))
    return t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def report(args, variants, t: Timings, config, targets, wall: float, load: tuple) -> str:
    tokens = args.batch * args.seq
    med = {v.name: statistics.median(t.wall[v.name]) for v in variants}
    cpu = {v.name: statistics.median(t.cpu[v.name]) for v in variants}
    rows = ["| variant | s/step (median) | min | max | tokens/s | vs a | CPU s/step | vs a (CPU) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        w = t.wall[v.name]
        rows.append(f"| {v.name}: {v.label} | {med[v.name]:.3f} | {min(w):.3f} | {max(w):.3f} "
                    f"| {tokens / med[v.name]:.1f} | {med['a'] / med[v.name]:.3f} "
                    f"| {cpu[v.name]:.3f} | {cpu['a'] / cpu[v.name]:.3f} |")
    verdict = ", ".join(f"{n}/a = {med['a'] / med[n]:.3f} "
                        f"({'ok' if med['a'] / med[n] >= TARGET_RATIO else 'BELOW'} target {TARGET_RATIO})"
                        for n in ("b", "c"))
    dtype = "float32" if args.float32 else "bfloat16 autocast"
    answered = (f"the last {args.answer} tokens of each row learned (the prompt masked, as in training)"
                if 0 < args.answer < args.seq else "every token learned")
    return "\n".join([
        f"Model {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), "
        f"LoRA targets {', '.join(targets)}; batch {args.batch} x {args.seq} tokens ({tokens} per step), "
        f"{answered}; {dtype}; k = {args.k}, stage-2 batch from {args.users} users.",
        f"Machine: {machine()}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"Timing: {args.warmup} warm-up step(s) per variant, then {args.reps} repetitions of "
        f"[a, b, c] blocks of {args.steps} steps; median over {args.reps * args.steps} steps per variant; "
        f"{wall:.0f} s in all.",
        "",
        *rows,
        "",
        f"Ratios (tokens/s of PROPER over plain PEFT, wall clock): {verdict}.",
        *([f"Note: the load average passed the {os.cpu_count()} cores: other processes shared them, so "
           "absolute speeds are low and noisy; compare the ratios (wall and CPU), not the tokens/s."]
          if max(load) > (os.cpu_count() or 1) else []),
    ])


def write_atomic(path: str, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load() -> float:
    """1-minute load average: how busy the machine was (other processes share the cores)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0, load0 = time.perf_counter(), _load()
    variants, targets, config = build(args)
    print(f"built in {time.perf_counter() - t0:.1f} s; measuring ...", flush=True)
    times = measure(variants, args.steps, args.reps, args.warmup, log=lambda s: print(s, flush=True))
    text = report(args, variants, times, config, targets, time.perf_counter() - t0, (load0, _load()))
    print()
    print(text)
    if args.out:
        command = "python -m bench.throughput " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_atomic(args.out, "\n".join([
            "# Training throughput: PROPER stages 2 and 3 against plain PEFT LoRA", "",
            "One full training step (forward, backward, gradient clipping, AdamW) on the same backbone",
            "weights and the same batch of random token ids:", "",
            "- a: plain PEFT, one LoRA (r=8, alpha 16) on every FFN linear layer;",
            f"- b: PROPER stage 2 on the population-merged backbone, k = {args.k} expert LoRAs (r=4) with the",
            "  user-aware router and the users' embeddings trainable, LM loss + constraint loss over the",
            "  users' routing mixtures (the body of `shared/method/stages.py:train_group`);",
            "- c: PROPER stage 3, one user's LoRA (r=4) and LoRA-aware router trainable, experts frozen",
            "  (the body of `shared/method/stages.py:train_user`).", "",
            f"Command (from the repository root): `{command}`", "", text, ""]))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
