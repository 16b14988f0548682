"""`proper report RUN [RUN ...] --out DIR`: one comparison of several runs, methods x metrics.

Reads what each run directory holds (config.yaml, table.json, table.md, rounds.jsonl, the clients'
state under client_state/ (proper local) or clients/*/ (proper sim), wire/*.jsonl, checkpoint/,
the exported artifacts) and writes into DIR:

  report.md    one table per evaluation split: every stage of every run, with the 95 % bootstrap
               CI over users of the headline metric, then the reference points
  report.csv   the same rows, one per (run, stage, split), for programs
  <metric>_<split>.png   the headline metric per row with its CI as error bars

Columns beyond the task metrics:
  stored/user  bytes of private state per user on its client: the files the client's UserStore
               keeps for that user (embedding, user LoRA + router, MTA retrieval + stacked LoRA),
               averaged over users
  sent/client/round  bytes a client uploads in one training round (array payload of its reply):
               the mean over every training reply in the run's wire audit (federation.audit_replies)
               and the largest one; without an audit, computed from the shapes of the shared
               parameters in the run's artifacts (marked "computed")
  wall         the run's wall time, from its table notes (else from its files' times)

Reference points, computed from the data of the first run on the same split as the runs: the most
frequent label of all users' training items answered everywhere, and each user's own most
frequent training label (ties: the label that comes first in the user's history); for the
LaMP-2 sample the numbers its SOURCE.md documents are listed too.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from shared.runtime.persist import atomic_write_text

STAGE_TITLES = {"base": "bare backbone", "population": "stage 1: population", "group": "stage 2: group",
                "user": "stage 3: user", "mta_merge": "MTA: merged anchors", "mta": "MTA: merged + stacked LoRA"}
METHOD_TITLES = {"proper": "PROPER", "population": "population LoRA (FedAvg)", "oppu": "OPPU-style",
                 "loramoe": "LoRAMoE", "mta": "MTA"}
# private files per user that a model at this stage needs (UserStore kinds)
STORED_KINDS = {"base": set(), "population": set(), "group": {"embedding"}, "user": {"embedding", "user", "router"},
                "mta_merge": {"mta"}, "mta": {"mta", "mta_user"}}
# the replies of the training rounds a model at this stage has been through (message types)
SENT_TYPES = {"base": set(), "population": {"train.population"},
              "group": {"train.population", "train.group", "query.mixtures"},
              "user": {"train.population", "train.group", "query.mixtures", "train.user"},
              "mta_merge": {"query.mta_candidates", "train.mta_anchor"},
              "mta": {"query.mta_candidates", "train.mta_anchor", "train.mta_user"}}
# the rounds.jsonl training stages that send those replies
STAGE_OF_TYPE = {"train.population": "population", "train.group": "group", "query.mixtures": "group",
                 "train.user": "user",
                 "query.mta_candidates": "mta_bank", "train.mta_anchor": "mta_bank", "train.mta_user": "mta_user"}
USER_FILE = re.compile(r"^(?P<user>.+-[0-9a-f]{8})\.(?P<kind>[^.]+)")
SAMPLE_DOCUMENTED = {  # ../shared/data/lamp/SOURCE.md, on the 72 LaMP questions (test split)
    "most frequent overall tag (SOURCE.md: all 10 profile items)": 0.153,
    "per-user most frequent tag (SOURCE.md: all 10 profile items)": 0.361,
    "SmolLM2-135M-Instruct zero-shot, most likely tag (SOURCE.md)": 0.111,
}


# ---------------------------------------------------------------- one run
class Run:
    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        if not (self.path / "table.json").is_file():
            raise FileNotFoundError(f"{self.path}: no table.json; not a finished run directory")
        config = self.path / "config.yaml"
        self.cfg = OmegaConf.load(config) if config.exists() else OmegaConf.create({})
        self.rows = json.loads((self.path / "table.json").read_text())
        # a run directory of any version, or without config.yaml: not checked against the schema
        self.method = str(self.cfg.get("method", "proper"))
        self.federated = (self.path / "checkpoint").is_dir() or (self.path / "clients").is_dir()
        where = "federated" if self.federated else "centralized"
        self.label = label or f"{METHOD_TITLES.get(self.method, self.method)} ({where})"

    def records(self) -> list[dict]:
        p = self.path / "rounds.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    # ---- wall time
    def wall_seconds(self) -> float | None:
        md = self.path / "table.md"
        if md.exists():
            m = re.search(r"wall time (\d+(?:\.\d+)?) s", md.read_text())
            if m:
                return float(m.group(1))
        start, end = self.path / "config.yaml", self.path / "table.json"
        if start.exists():
            return end.stat().st_mtime - start.stat().st_mtime
        return None

    # ---- bytes stored per user
    def state_dirs(self) -> list[Path]:
        dirs = [self.path / "client_state"] if (self.path / "client_state").is_dir() else []
        if (self.path / "clients").is_dir():
            dirs += [d for d in sorted((self.path / "clients").iterdir()) if d.is_dir()]
        return dirs

    def stored_per_user(self, stage: str | None = None) -> tuple[float | None, dict[str, int]]:
        """(mean bytes over users, {kind: mean bytes}) of the users' private files that a model at
        `stage` needs (all of them when stage is None)."""
        kinds = STORED_KINDS.get(stage) if stage else None
        per_user: dict[str, int] = {}
        per_kind: dict[str, int] = {}
        for d in self.state_dirs():
            for entry in d.iterdir():
                m = USER_FILE.match(entry.name)
                if not m:
                    continue  # client-level files (e.g. the mixtures it last sent), not a user's
                key = f"{d.name}/{m.group('user')}"
                per_user.setdefault(key, 0)
                if kinds is not None and m.group("kind") not in kinds:
                    continue
                size = _size(entry)
                per_user[key] += size
                per_kind[m.group("kind")] = per_kind.get(m.group("kind"), 0) + size
        if not per_user:
            return None, {}
        n = len(per_user)
        return float(np.mean(list(per_user.values()))), {k: v / n for k, v in per_kind.items()}

    # ---- bytes sent per client per round
    def sent_per_round(self, stage: str | None = None) -> tuple[float | None, float | None, str]:
        """(mean, max, source) of the bytes one client uploads in one training round, over the
        rounds a model at `stage` went through (all training rounds when stage is None)."""
        types = SENT_TYPES.get(stage) if stage else None
        wire = sorted((self.path / "wire").glob("*.jsonl")) if (self.path / "wire").is_dir() else []
        sizes = []
        for f in wire:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                mt = str(r.get("message_type", ""))
                if mt.split(".")[0] in ("train", "query") and not r.get("error") and (types is None or mt in types):
                    sizes.append(int(r.get("bytes", 0)))
        if sizes:
            return float(np.mean(sizes)), float(max(sizes)), "audit"
        if wire:
            return None, None, ""
        stages = None if types is None else {STAGE_OF_TYPE[t] for t in types}
        sizes = [n for st, n in self._computed_uploads() if stages is None or st in stages]
        if sizes:
            return float(np.mean(sizes)), float(max(sizes)), "computed"
        return None, None, ""

    def _computed_uploads(self) -> list[tuple[str, int]]:
        """One (training stage, bytes) per (client, training round): what its reply would carry,
        from the shapes of the shared parameters this run produced."""
        pop, group = self._shared_parts()
        per_client = int(OmegaConf.select(self.cfg, "federation.users_per_client", default=1) or 1)
        users = max((r.get("users", 0) for r in self.rows), default=0) or 1
        clients = max(1, -(-users // per_client))
        out: list[tuple[str, int]] = []
        for rec in self.records():
            if rec.get("kind") != "train":
                continue
            stage = rec.get("stage")
            if stage == "population" and pop:
                out += [(stage, pop)] * clients
            elif stage == "group" and group:
                n_layers, k = self._layers_k()
                out += [(stage, group + 4 * n_layers * k * (1 + per_client))] * clients  # + routing mass, mixtures
            elif stage in ("user", "mta_user"):
                out += [(stage, 0)] * clients
            elif stage == "mta_bank":
                bank = self.path / "mta_bank.safetensors"
                if bank.exists():
                    from shared.method.mta import Bank
                    b = Bank.load(bank)
                    cand = int(OmegaConf.select(self.cfg, "mta.candidates_per_client", default=1) or 1)
                    out += [(stage, cand * (4 * b.embeddings.shape[1] + 8))] * clients
                    lora = int(sum(v.numel() * 4 for v in b.loras[0].values())) if len(b) else 0
                    out += [(stage, lora)] * len(b)
        return out

    def _shared_parts(self) -> tuple[int, int]:
        """float32 bytes of the population LoRA and of the group part: from the federated server's
        last checkpoint, else from the artifacts `proper local` exports."""
        from safetensors import safe_open
        sizes = {"population": 0, "group": 0}
        ckpts = self._checkpoints()
        if ckpts:
            files = [(ckpts[-1], None)]
        else:
            files = [(self.path / "population_lora" / "adapter_model.safetensors", "population"),
                     (self.path / "group.safetensors", "group")]
        for path, part in files:
            if not path.exists():
                continue
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    which = part or key.partition("/")[0]
                    if which in sizes:
                        sizes[which] += int(np.prod(f.get_slice(key).get_shape())) * 4
        return sizes["population"], sizes["group"]

    def _checkpoints(self) -> list[Path]:
        """The federated run's checkpoint files, oldest first ([] for a local run)."""
        d = self.path / "checkpoint"
        return sorted(d.glob("state-*.safetensors")) if d.is_dir() else []

    def _layers_k(self) -> tuple[int, int]:
        """(layers with experts, k), for the routing mass and mixtures a group reply carries."""
        from safetensors import safe_open
        k = int(OmegaConf.select(self.cfg, "adapters.k", default=5) or 5)
        ckpts = self._checkpoints()
        for path in [*ckpts[-1:], self.path / "group.safetensors"]:
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    n = sum(1 for key in f.keys() if key.endswith(".expert_A"))
                if n:
                    return n, k
        return 0, k


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------- reference points from the data
def majority_rows(cfg, splits: list[str]) -> list[dict]:
    """The two majority baselines, on the runs' own users and splits (label and rating tasks)."""
    from shared.data.lamp import load_lamp
    from shared.evaluation.metrics import add_stats, bootstrap_ci, example_stats, per_example_scores, stats_metrics
    d = cfg.data
    spec, users = load_lamp(d.path, task=d.get("task"), holdout=int(d.get("holdout") or 0),
                            max_users=d.get("max_users"), longest=bool(d.get("longest", False)))
    if spec.kind not in ("label", "rating"):
        return []
    if d.get("template", "official") != "official":
        from shared.data.lamp import apply_template
        users = apply_template(users, spec.name, d.template)
    overall = Counter(ex.output for u in users for ex in u.train).most_common(1)[0][0]
    lookup = _other_users_labels(users)
    rows = []
    for split in splits:
        for name, pick in ((f"most frequent training label overall ({overall!r})", lambda u, ex: overall),
                           ("each user's most frequent training label", lambda u, ex: _own_majority(u)),
                           ("lookup: another user's label for the same input, else the user's most frequent",
                            lambda u, ex: lookup(u, ex) or _own_majority(u))):
            stats, scores = None, []
            for u in users:
                exs = getattr(u, split)
                if not exs:
                    continue
                preds, golds = [pick(u, ex) for ex in exs], [ex.output for ex in exs]
                stats = add_stats(stats, example_stats(spec, preds, golds))
                scores.append(float(np.mean(per_example_scores(spec, preds, golds))))
            if not stats:
                continue
            row = {"label": name, "stage": "reference", "split": split, "metrics": stats_metrics(spec, stats),
                   "users": len(scores), "examples": int(stats["n"][0])}
            if len(scores) > 1:
                _, lo, hi = bootstrap_ci(scores)
                row["ci"] = {spec.metrics[0]: [lo, hi]}
            rows.append(row)
    return rows


def _other_users_labels(users):
    """What remembering other users' training items gives: for a query, the most frequent label
    that other users' training items with exactly the same input carry (None if there are none)."""
    by_input: dict[str, list[tuple[str, str]]] = {}
    for u in users:
        for ex in u.train:
            by_input.setdefault(ex.input, []).append((u.user_id, ex.output))
    def pick(user, ex):
        labels = Counter(lab for uid, lab in by_input.get(ex.input, []) if uid != user.user_id)
        return labels.most_common(1)[0][0] if labels else None
    return pick


def _own_majority(user) -> str:
    counts = Counter(ex.output for ex in user.train)
    best = max(counts.values())
    return next(ex.output for ex in user.train if counts[ex.output] == best)  # first in history among ties


def documented_rows(cfg, splits: list[str], metric: str) -> list[dict]:
    if "test" not in splits or "LaMP_2-movie-tagging-subset" not in str(cfg.data.path):
        return []
    return [{"label": name, "stage": "reference", "split": "test", "metrics": {metric: v}, "users": 72,
             "examples": 72, "documented": True} for name, v in SAMPLE_DOCUMENTED.items()]


# ---------------------------------------------------------------- the report
def build_report(run_paths: list[str], out: str | Path, labels: list[str] | None = None,
                 command: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(p, (labels or [None] * len(run_paths))[i]) for i, p in enumerate(run_paths)]
    from shared.data.lamp import task_spec
    spec = None
    for r in runs:
        task = OmegaConf.select(r.cfg, "data.task") or _task_of(r)
        if task:
            spec = task_spec(task)
            break
    metrics = spec.metrics if spec else sorted({m for r in runs for row in r.rows for m in row["metrics"]})
    head = metrics[0]
    splits = list(dict.fromkeys(row.get("split", "test") for r in runs for row in r.rows))

    rows, seen_base = [], {}
    for r in runs:
        wall = r.wall_seconds()
        for row in r.rows:
            stored, stored_kinds = r.stored_per_user(row["stage"])
            sent_mean, sent_max, source = r.sent_per_round(row["stage"])
            split = row.get("split", "test")
            if row["stage"] == "base":  # the bare backbone is the same in every run: list it once
                key = (split, json.dumps(row["metrics"], sort_keys=True))
                if key in seen_base:
                    continue
                seen_base[key] = r.label
            rows.append({"label": "bare backbone" if row["stage"] == "base" else
                         f"{r.label}: {STAGE_TITLES.get(row['stage'], row['stage'])}",
                         "method": r.method, "stage": row["stage"], "split": split, "run": str(r.path),
                         "metrics": row["metrics"], "ci": row.get("ci") or {}, "users": row.get("users"),
                         "examples": row.get("examples"),
                         "stored": None if row["stage"] == "base" else stored,
                         "stored_kinds": {} if row["stage"] == "base" else stored_kinds,
                         "sent_mean": None if row["stage"] == "base" else sent_mean,
                         "sent_max": None if row["stage"] == "base" else sent_max,
                         "sent_source": "" if row["stage"] == "base" else source,
                         "wall": None if row["stage"] == "base" else wall})
    refs = []
    if runs and "path" in (runs[0].cfg.get("data") or {}):
        try:
            refs = majority_rows(runs[0].cfg, splits) + documented_rows(runs[0].cfg, splits, head)
        except (OSError, ValueError) as e:  # the data moved or is unreadable: report without them
            print(f"proper report: no majority baselines ({e})", file=sys.stderr)
    for ref in refs:
        rows.append({**ref, "method": "reference", "run": "", "ci": ref.get("ci") or {}, "stored": None,
                     "stored_kinds": {}, "sent_mean": None, "sent_max": None, "sent_source": "", "wall": None})

    md = _markdown(rows, metrics, splits, runs, command)
    if refs:
        d = runs[0].cfg.data
        md += (f"- reference rows computed from the data of `{runs[0].path}`: {d.path}, holdout "
               f"{d.get('holdout') or 0}\n")
        data_keys = {json.dumps({k: str(r.cfg.data.get(k)) for k in ("path", "holdout", "max_users", "longest")})
                     for r in runs if r.cfg.get("data")}
        if len(data_keys) > 1:
            md += "- WARNING: the runs do not all use the same users and splits (data.* differs); compare with care\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", _csv(rows, metrics))
    for split in splits:
        _plot(rows, head, split, out / f"{head}_{split}.png")
    return out / "report.md"


def _task_of(run: Run) -> str | None:
    md = run.path / "table.md"
    m = re.search(r"task (LaMP_\w+)", md.read_text()) if md.exists() else None
    return m.group(1) if m else None


def _fmt_bytes(n) -> str:
    if n is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _markdown(rows, metrics, splits, runs, command) -> str:
    split_titles = {"test": "test: the users' LaMP questions", "val": "val: held-out profile items (never trained on)"}
    text = "# Methods compared\n\n"
    if command:
        text += f"Made by: `{command}`\n\n"
    for split in splits:
        text += f"## {split_titles.get(split, split)}\n\n"
        head = ["method / stage", *metrics, "users", "stored/user", "sent/client/round (mean, max)", "wall"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [r for r in rows if r["split"] == split]:
            cells = [r["label"]]
            for m in metrics:
                v = r["metrics"].get(m)
                c = "" if v is None else f"{v:.4f}"
                ci = r["ci"].get(m)
                if ci:
                    c += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                cells.append(c)
            sent = "" if r["sent_mean"] is None else (f"{_fmt_bytes(r['sent_mean'])}, {_fmt_bytes(r['sent_max'])}"
                                                       + (" (computed)" if r["sent_source"] == "computed" else ""))
            cells += [str(r.get("users") or ""), _fmt_bytes(r["stored"]), sent,
                      "" if r["wall"] is None else f"{r['wall']:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        text += "\n".join(lines) + "\n\n"
    text += "Notes\n\n"
    text += ("- [lo, hi]: 95 % percentile bootstrap CI over users of the headline metric; reference rows "
             "marked (SOURCE.md) are the documented values, the others are computed from the runs' data on "
             "the same split\n")
    text += ("- stored/user: the user's private files on its client (UserStore), mean over users; "
             "sent/client/round: array bytes of one client's reply to one training round (wire audit, "
             "else computed from the shared parameters' shapes); wall: the run's wall time\n")
    kinds = {r["label"]: r["stored_kinds"] for r in rows
             if r["stored_kinds"] and r["split"] == splits[0] and r["stage"] in ("user", "mta")}
    if kinds:
        text += "- stored/user by kind: " + "; ".join(
            f"{label}: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(ks.items()))
            for label, ks in kinds.items()) + "\n"
    for run in runs:
        text += f"- {run.label}: `{run.path}`\n"
    return text


def _csv(rows, metrics) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["split", "row", "method", "stage", *metrics, "ci_lo", "ci_hi", "users", "examples",
                "bytes_stored_per_user", "bytes_sent_per_client_round_mean", "bytes_sent_per_client_round_max",
                "bytes_sent_source", "wall_seconds", "run"])
    for r in rows:
        ci = r["ci"].get(metrics[0]) or ["", ""]
        w.writerow([r["split"], r["label"], r["method"], r["stage"], *[_num(r["metrics"].get(m)) for m in metrics],
                    _num(ci[0]), _num(ci[1]), r.get("users", ""), r.get("examples", ""), _num(r["stored"]),
                    _num(r["sent_mean"]), _num(r["sent_max"]), r["sent_source"], _num(r["wall"]), r["run"]])
    return buf.getvalue()


def _num(v):
    if v is None or v == "":
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def _plot(rows, metric, split, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    part = [r for r in rows if r["split"] == split and metric in r["metrics"]]
    if not part:
        return
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(part) + 1.6))
    ys = np.arange(len(part))[::-1]
    for y, r in zip(ys, part):
        v = r["metrics"][metric]
        ci = r["ci"].get(metric)
        color = "#999" if r["method"] == "reference" else ("#a47" if r["stage"] in ("user", "mta") else "#47a")
        err = None if not ci else [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
        ax.barh(y, v, color=color, alpha=0.85, xerr=err, capsize=3)
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in part], fontsize=8)
    ax.set_xlabel(f"{metric} (95 % bootstrap CI over users)")
    ax.set_title(f"{metric} per method, split {split}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)  # as sim/cli.py words errors
        return 2
    command = args.command or "proper report " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    path = build_report(args.runs, args.out, labels, command)
    print(path.read_text())
    return 0
