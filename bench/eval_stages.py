"""Stage-3 evaluation of many users against stage-2 evaluation of the same queries.

Both go through the client's own evaluation (client/trainer.py, ClientTrainer.evaluate), on the same
users and test queries, with the same batch size:

  group   stage 2: population merged, experts routed per row by each user's e_u, shared batches
  user    stage 3: each user's LoRA and LoRA-aware router read from the client's store, and rows of
          many users in one batch (ProperModel.user_parts), as the evaluation of a run does it

Users are synthetic (headline generation in LaMP_4's format, one test query each, or LaMP_2 with
--task); every adapter holds random values of trained-model scale (speed does not depend on them),
a different user part per user. After a warm-up of both stages on one user, the stages run
interleaved, R repetitions of [group, user]; the ratio of the median times is the number to compare
(target <= 1.3). Random adapters make the instruct model end its answer at once, so by default every
query decodes the full max_new_tokens (HF's min_new_tokens, set on the model's generate for this bench
only), as a trained model writing headlines does and so that both stages decode the same positions
(the table counts them); --stop-at-end keeps the evaluation's own stopping.

    python -m bench.eval_stages                      # tiny model
    python -m bench.eval_stages --model embedded     # SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import append_result, machine

TARGET = 1.3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | a local HF path")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--task", default="LaMP_4", help="LaMP_4 (generation) or LaMP_2 (labels)")
    ap.add_argument("--new-tokens", type=int, default=None, help="eval.max_new_tokens (default: the task's)")
    ap.add_argument("--batch-size", type=int, default=16, help="eval.batch_size")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stop-at-end", action="store_true", help="let generation stop at the end token")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/results/bench.md")
    return ap.parse_args(argv)


def build(args, root: Path):
    """A client holding `args.users` synthetic users, their private parts in its store; the shared parts."""
    from client.trainer import ClientTrainer, load_users
    from shared.data.synthetic import write_synthetic_lamp
    from shared.runtime.config import load_config
    data = write_synthetic_lamp(root / "data", n_users=args.users, n_groups=4, seed=0, min_profile=4,
                                max_profile=8, task=args.task)
    cfg = load_config(None, [f"model.name={args.model}", f"data.path={data}", "train.bf16=auto",
                             f"eval.batch_size={args.batch_size}", "data.holdout=0"]
                      + ([f"eval.max_new_tokens={args.new_tokens}"] if args.new_tokens else []))
    spec, users = load_users(cfg)
    client = ClientTrainer(cfg, spec, users, str(root / "state"))
    model, g = client.model, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in model.layers():  # shared adapters of trained-model scale
            layer.lora_B.normal_(0, 0.01, generator=g)
            layer.expert_B.normal_(0, 0.01, generator=g)
    population = model.part_state("population")
    group = model.part_state("group")
    with torch.no_grad():
        for u in users:                   # a different user part and e_u per user, stored as a run stores them
            for _, layer in model.layers():
                layer.user_A.normal_(0, 0.02, generator=g)
                layer.user_B.normal_(0, 0.01, generator=g)
                layer.router_g.normal_(0, 0.1, generator=g)
                layer.router_g_bias.normal_(0, 0.1, generator=g)
            client.save_user_adapter(u.user_id)
            e_u = torch.randn(model.d_user, generator=g)
            client.store.save(u.user_id, "embedding",
                              {"e_u": e_u, "e_u_before": e_u.clone(), "round": torch.tensor([1])})
    if not args.stop_at_end:
        import functools

        from shared.evaluation.evaluate import MAX_NEW_TOKENS
        n = cfg.eval.max_new_tokens or MAX_NEW_TOKENS[spec.kind]
        model.lm.generate = functools.partial(type(model.lm).generate, model.lm, min_new_tokens=n)
    return cfg, client, population, group


def count_decoding():
    """Wrap the evaluation's generation loop to count decoded positions (rows x steps); the counter."""
    import shared.evaluation.evaluate as E
    real, counter = E.generate_tokens, {"positions": 0}

    def counted(*a, **kw):
        out = real(*a, **kw)
        counter["positions"] += sum(len(row) for row in out)
        return out
    E.generate_tokens = counted
    return counter


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cfg, client, pop, group = build(args, Path(d))
        queries = sum(len(u.test) for u in client.users)
        print(f"built in {time.perf_counter() - t0:.1f} s: {len(client.users)} users, {queries} test queries",
              flush=True)
        from client.trainer import ClientTrainer
        one = ClientTrainer(cfg, client.spec, client.users[:1], str(client.store.root))  # same model and store
        for stage in ("group", "user"):
            one.evaluate(stage, pop, group, split="test")
        counter = count_decoding()
        times, scores, decoded = {"group": [], "user": []}, {}, {}
        for rep in range(args.reps):
            for stage in times:
                t, before = time.perf_counter(), counter["positions"]
                r = client.evaluate(stage, pop, group, split="test")
                times[stage].append(time.perf_counter() - t)
                scores[stage], decoded[stage] = r.num_examples, counter["positions"] - before
            print(f"  rep {rep + 1}/{args.reps}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["user"] / med["group"]
    from shared.evaluation.evaluate import MAX_NEW_TOKENS
    from shared.runtime.precision import use_bf16
    kind = "generation" if args.task in ("LaMP_4", "4") else "label"
    rows = ["| stage | s per evaluation (median) | runs | queries | decoded positions | queries/s | "
            "stage 3 / stage 2 |", "|---|---:|---|---:|---:|---:|---:|"]
    for k in ("group", "user"):
        rows.append(f"| {'stage 2: group' if k == 'group' else 'stage 3: user'} | {med[k]:.2f} | "
                    f"{', '.join(f'{x:.2f}' for x in times[k])} | {scores[k]} | {decoded.get(k, '')} | "
                    f"{scores[k] / med[k]:.2f} | "
                    f"{'' if k == 'group' else f'{ratio:.3f}'} |")
    text = "\n".join([
        f"Model {args.model}; {args.users} synthetic users ({args.task} format), one test query each; "
        f"eval.mode {cfg.eval.mode}, batch size {args.batch_size}, "
        f"{args.new_tokens or cfg.eval.max_new_tokens or MAX_NEW_TOKENS[kind]} new tokens at most; "
        f"{'bfloat16 autocast' if use_bf16(cfg.train.bf16) else 'float32'}; "
        f"{'stopping at the end token' if args.stop_at_end else 'every query decoding all of them'}. "
        "Adapters: random values of "
        "trained scale, a different user part per user, read from the client's store in stage 3.",
        f"Machine: {machine()}.",
        f"Timing: {args.reps} repetitions of [stage 2, stage 3] through ClientTrainer.evaluate; medians; "
        f"{time.perf_counter() - t0:.0f} s in all.",
        "",
        *rows,
        "",
        f"Stage-3 over stage-2 evaluation time: {ratio:.3f} ({'ok' if ratio <= TARGET else 'ABOVE'} target "
        f"{TARGET}).",
    ])
    print()
    print(text)
    if not args.no_append:
        command = "python -m bench.eval_stages " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("appended to", append_result("e. stage-3 evaluation vs stage-2 evaluation", command, text))


if __name__ == "__main__":
    main()
