"""Does a user enrolled after the run score like the users trained in it? (issue: users who join later)

One invocation, on LaMP files with held-out profile items (data.holdout, the val split):

  1. splits the users: K drawn at random (seeded) become "new" users, the rest the run's users;
  2. `proper local -c CONFIG` on the run's users (its per_user.csv has every trained user's val score);
  3. `proper enroll` of the K new users on that finished run (client/serving.py: e_u, user LoRA and
     LoRA-aware router trained on the frozen shared parts, no server round);
  4. scores the enrolled users' val items through their stage-3 models (Serving.load_user, then the
     evaluation's own predict), and, as a check that this path is the evaluation's, a few trained
     users the same way against their per_user.csv scores;
  5. with --paired, `proper local` on all users (the K included, same config and seed): the same
     users' val scores when trained in the run, for a paired difference;
  6. with --random-start, the same K users enrolled again into a copy of the run with e_u started at
     their own seeded draw rather than at the code of the expert that fits them (client/serving.py;
     only differs where the run kept an assignment: group.constraint_form=assign, reassign=false).

"Within the spread" is read two ways: the enrolled users' mean against the distribution of the mean
of K users drawn from the trained ones (2.5-97.5 %), and the paired difference's bootstrap interval.

    python -m bench.enroll_spread --k 12 --paired --work /tmp/enroll   # LaMP-2 sample, lamp2_quick
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import append_result, machine
from shared.evaluation.metrics import bootstrap_ci

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lamp" / "LaMP_2-movie-tagging-subset"


def split_users(data: Path, out_run: Path, out_new: Path, k: int, seed: int) -> list[str]:
    """Write two LaMP directories: the run's users and the K new ones (questions and golds split by
    user, records unchanged). Returns the new users' ids."""
    questions = json.loads((data / "questions.json").read_text(encoding="utf-8"))
    outputs = json.loads((data / "outputs.json").read_text(encoding="utf-8"))
    ids = sorted({str(q["user_id"]) for q in questions if q.get("profile")})
    new = set(random.Random(seed).sample(ids, k))
    golds = {str(g["id"]): g for g in outputs["golds"]}
    for out, keep in ((out_run, lambda q: str(q["user_id"]) not in new), (out_new, lambda q: str(q["user_id"]) in new)):
        out.mkdir(parents=True, exist_ok=True)
        qs = [q for q in questions if keep(q)]
        (out / "questions.json").write_text(json.dumps(qs), encoding="utf-8")
        (out / "outputs.json").write_text(json.dumps({"task": outputs["task"],
                                                      "golds": [golds[str(q["id"])] for q in qs]}), encoding="utf-8")
    return sorted(new)


def proper(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "sim.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def enrolled_already(run_dir: Path, user_ids: list[str]) -> bool:
    from client.serving import Serving, ServingError
    serving = Serving(run_dir)
    try:
        for uid in user_ids:
            serving.store_of(uid)
    except ServingError:
        return False
    return True


def val_scores(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "per_user.csv", newline="") as f:
        return {row["user"]: float(row["user@val"]) for row in csv.DictReader(f) if row.get("user@val", "") != ""}


def score_users(run_dir: Path, data: Path, user_ids: list[str]) -> dict[str, float]:
    """Each user's val score through its stage-3 model as `proper generate` loads it."""
    import torch

    from client.serving import Serving
    from shared.data.lamp import apply_template, load_lamp
    from shared.evaluation.evaluate import predict
    from shared.evaluation.metrics import per_example_scores

    serving = Serving(run_dir)
    cfg = serving.cfg
    spec, users = load_lamp(data, task=cfg.data.task, holdout=cfg.data.holdout)
    by_id = {u.user_id: u for u in apply_template(users, spec.name, cfg.data.template)}
    out = {}
    for uid in user_ids:
        u = by_id[uid]
        e_u = serving.load_user(uid)
        with torch.no_grad():
            preds = predict(serving.model, serving.tokenizer, spec, u.val, cfg,
                            user_emb=e_u.view(1, -1).expand(len(u.val), -1))
        out[uid] = float(np.mean(per_example_scores(spec, preds, [ex.output for ex in u.val])))
    return out


def enroll_random_start(run_dir: Path, data: Path, user_ids: list[str]) -> None:
    """`proper enroll` of the users with e_u started at their own seeded draw: the enrollment before
    the expert's-code start, for comparison (in process; the start rule is switched off here only)."""
    import client.serving as serving_mod
    serving = serving_mod.Serving(run_dir)
    chosen = serving_mod.read_users(serving.cfg, data, user_ids)
    real = serving_mod.starts_at_expert_code
    serving_mod.starts_at_expert_code = lambda _cfg: False
    try:
        serving.enroll(chosen)
    finally:
        serving_mod.starts_at_expert_code = real


def bootstrap(x: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of the mean (the evaluation's own, 10000 resamples)."""
    _, lo, hi = bootstrap_ci(x, n_boot=10000)
    return lo, hi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--config", default="lamp2_quick")
    ap.add_argument("--k", type=int, default=12, help="new users, drawn at random")
    ap.add_argument("--seed", type=int, default=0, help="draws the new users")
    ap.add_argument("--paired", action="store_true", help="also train every user in one run, for a paired difference")
    ap.add_argument("--random-start", action="store_true",
                    help="also enroll the users into a copy of the run from a random e_u, for a paired difference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/enroll_spread")
    ap.add_argument("--override", action="append", default=[], help="key=value for the runs (repeat)")
    ap.add_argument("--no-record", action="store_true", help="do not append to docs/results/bench.md")
    a = ap.parse_args(argv)
    work, data = Path(a.work), Path(a.data).resolve()
    t0 = time.time()
    new = split_users(data, work / "data_run", work / "data_new", a.k, a.seed)
    print(f"new users ({len(new)}): {' '.join(new)}", flush=True)
    common = ["eval.splits=[val]", "eval.stages=[user]", f"output.dir={work}", *a.override]
    run = work / "run"
    if not (run / "per_user.csv").is_file():
        proper("local", "-c", a.config, f"data.path={work / 'data_run'}", "output.name=run", *common, threads=a.threads)
    t_run = time.time() - t0
    if a.random_start and not (work / "run_random").exists():   # a copy before anyone is enrolled
        if enrolled_already(run, new):
            raise SystemExit(f"{run}: the users are enrolled already; --random-start needs a fresh --work")
        shutil.copytree(run, work / "run_random")
    t = time.time()
    if not enrolled_already(run, new):   # a rerun (e.g. to add --paired) keeps the first enrollment
        proper("enroll", str(run), "--data", str(work / "data_new"), threads=a.threads)
    t_enroll = time.time() - t

    import torch
    torch.set_num_threads(a.threads)
    trained = val_scores(run)
    enrolled = score_users(run, work / "data_new", new)
    check_ids = sorted(trained)[:4]
    check = score_users(run, work / "data_run", check_ids)
    mismatch = max(abs(check[u] - trained[u]) for u in check_ids)

    rng = np.random.default_rng(a.seed)
    pool = np.array(list(trained.values()))
    draws = np.array([rng.choice(pool, size=len(new), replace=False).mean() for _ in range(10000)])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    e = np.array([enrolled[u] for u in new])
    (plo, phi), (elo, ehi) = bootstrap(pool), bootstrap(e)
    lines = [
        f"Data {data.name}: {len(trained)} users trained in the run (`proper local -c {a.config}`), {len(new)} drawn "
        f"at random (seed {a.seed}) and enrolled after it (`proper enroll`); val = each user's held-out profile items.",
        "",
        "| users | n | val accuracy (mean) | interval |",
        "|---|---:|---:|---|",
        f"| trained in the run | {len(pool)} | {100 * pool.mean():.1f} | "
        f"bootstrap 95 % [{100 * plo:.1f}, {100 * phi:.1f}] |",
        f"| mean of {len(new)} trained users drawn at random | {len(new)} | {100 * draws.mean():.1f} | 2.5-97.5 % "
        f"[{100 * lo:.1f}, {100 * hi:.1f}] |",
        f"| enrolled after the run | {len(new)} | {100 * e.mean():.1f} | "
        f"bootstrap 95 % [{100 * elo:.1f}, {100 * ehi:.1f}] |",
    ]
    verdict = "within" if lo <= e.mean() <= hi else "outside"
    notes = [f"The enrolled users' mean is **{verdict}** the spread of the mean of {len(new)} trained users."]
    if a.paired:
        full = work / "run_all"
        t = time.time()
        if not (full / "per_user.csv").is_file():
            proper("local", "-c", a.config, f"data.path={data}", "output.name=run_all", *common, threads=a.threads)
        t_full = time.time() - t
        same = val_scores(full)
        d = np.array([enrolled[u] - same[u] for u in new])
        dlo, dhi = bootstrap(d)
        lines.append(f"| the same {len(new)} users trained in a run of all {len(same)} | {len(new)} | "
                     f"{100 * np.mean([same[u] for u in new]):.1f} | paired difference enrolled - trained "
                     f"{100 * d.mean():+.1f}, bootstrap 95 % [{100 * dlo:+.1f}, {100 * dhi:+.1f}] |")
        notes.append(f"Run of all users: {t_full:.0f} s.")
    if a.random_start:
        rand_run = work / "run_random"
        if not enrolled_already(rand_run, new):
            enroll_random_start(rand_run, work / "data_new", new)
        rand = score_users(rand_run, work / "data_new", new)
        d = np.array([enrolled[u] - rand[u] for u in new])
        dlo, dhi = bootstrap(d)
        lines.append(f"| the same {len(new)} users enrolled from a random e_u | {len(new)} | "
                     f"{100 * np.mean([rand[u] for u in new]):.1f} | paired difference expert's code - random "
                     f"{100 * d.mean():+.1f}, bootstrap 95 % [{100 * dlo:+.1f}, {100 * dhi:+.1f}] |")
    notes.append(f"Check of the scoring path: {len(check_ids)} trained users scored as the enrolled ones are "
                 f"differ from their per_user.csv scores by at most {100 * mismatch:.1f} points.")
    notes.append(f"Wall time: run {t_run:.0f} s, enrollment of {len(new)} users {t_enroll:.0f} s "
                 f"({t_enroll / len(new):.0f} s a user, model load included), {a.threads} thread(s).")
    notes.append("Per user (val accuracy, enrolled): " + ", ".join(f"{u} {100 * enrolled[u]:.0f}" for u in new))
    body = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\nMachine: {machine()}\n"
    print(body)
    (work / "enroll_spread.md").write_text(body, encoding="utf-8")
    if not a.no_record:
        cmd = "python -m bench.enroll_spread " + " ".join(argv if argv is not None else sys.argv[1:])
        append_result("f. a user enrolled after the run against the users trained in it", cmd, body)


if __name__ == "__main__":
    main()
