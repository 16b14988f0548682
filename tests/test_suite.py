"""bench/suite.py: the registry's sides (and no config choosing on the held-out one), a two-cell suite
end to end with the tiny model whose tables carry the runs' own numbers, and resuming."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

import bench.suite as suite
from bench.suite import DEV_SEEDS, HELDOUT_SEEDS, RUN_SEEDS, Dataset, registry

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=tiny", "train.bf16=false", "train.max_len=96", "population.rounds=1", "group.rounds=1",
        "eval.max_new_tokens=4"]


# ---------------------------------------------------------------- the registry: dev and held-out apart
def test_registry_sides_are_disjoint_and_cover_the_issue():
    assert not set(DEV_SEEDS) & set(HELDOUT_SEEDS)
    assert not set(RUN_SEEDS) & set(HELDOUT_SEEDS)   # a run seed is never a held-out draw seed
    reg = registry()
    assert len({d.name for d in reg}) == len(reg)
    dev = [d for d in reg if d.side == "dev"]
    held = [d for d in reg if d.side == "heldout"]
    assert {d.side for d in reg} == {"dev", "heldout"}
    assert all(d.seed in DEV_SEEDS for d in dev if d.source == "synth")
    assert all(d.seed in HELDOUT_SEEDS for d in held if d.source == "synth")
    # dev: the sample's val split only, LaMP_2 with 3 and 5 groups, a LaMP_4 draw
    assert [d.splits for d in dev if d.source == "lamp2"] == [("val",)]
    assert {(d.task, d.groups) for d in dev if d.source == "synth"} == {("LaMP_2", 3), ("LaMP_2", 5), ("LaMP_4", 3)}
    # held-out: every dev family again, other group counts and size laws, LaMP_3 and LaMP_5, the test split
    assert {d.family for d in dev if d.family} <= {d.family for d in held if d.family}
    assert {2, 4, 8} <= {d.groups for d in held if d.task == "LaMP_2"}
    assert {"uniform", "fixed"} <= {d.size_law for d in held}
    assert any(d.pareto_shape < 1.5 for d in held) and any(d.min_profile == 3 for d in held if d.size_law == "fixed")
    assert {"LaMP_3", "LaMP_5"} <= {d.task for d in held}
    assert [d.splits for d in held if d.source == "lamp2"] == [("test",)]
    # no held-out draw repeats a dev one
    key = lambda d: (d.task, d.groups, d.seed, d.size_law, d.pareto_shape, d.min_profile)   # noqa: E731
    assert not {key(d) for d in dev if d.source == "synth"} & {key(d) for d in held if d.source == "synth"}


def test_the_docs_registry_table_is_the_registry():
    doc = (ROOT / "docs" / "results" / "suite.md").read_text()
    assert suite.registry_markdown() in doc


def _seeds(node, path=""):
    """(where, value) of every key naming a seed in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            if "seed" in str(k).lower() and isinstance(v, (int, str)):
                yield where, v
            yield from _seeds(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _seeds(v, f"{path}[{i}]")


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def held_out_mentions(text: str, suffix: str) -> list[str]:
    """What in a config (YAML) or a bench script's defaults names the held-out side."""
    found = []
    held = [d for d in registry() if d.side == "heldout" and d.source == "synth"]
    if suffix in (".yaml", ".yml"):
        tree = yaml.safe_load(text) or {}
        for where, v in _seeds(tree):
            if str(v).strip().isdigit() and int(v) in HELDOUT_SEEDS:
                found.append(f"{where}: {v} is a held-out draw seed")
        for s in _strings(tree):
            if "heldout/" in s or any(re.search(rf"(^|/){re.escape(d.name)}(/|$)", s) for d in held):
                found.append(f"{s!r} is a held-out data directory")
    else:   # a bench script: its seed defaults (argparse or keyword)
        for m in re.finditer(r"seed[\w\"']*\s*[,=:]\s*(?:type=int,\s*)?(?:default=)?(\d+)", text):
            if int(m.group(1)) in HELDOUT_SEEDS:
                found.append(f"{m.group(0)!r}: a held-out draw seed")
        if "data/heldout/" in text.replace("\\", "/"):
            found.append("a held-out data directory")
    return found


def test_the_scan_catches_a_held_out_seed_and_path():
    assert held_out_mentions("seed: 101\n", ".yaml")
    assert held_out_mentions("data:\n  synthetic: {n_users: 4}\nprivacy:\n  canaries: {seed: 102}\n", ".yaml")
    assert held_out_mentions("data:\n  path: suite/data/heldout/l2-g3-s101\n", ".yaml")
    assert held_out_mentions("data:\n  path: /x/l3-g3-s102\n", ".yaml")
    assert held_out_mentions('ap.add_argument("--seed", type=int, default=101)', ".py")
    assert not held_out_mentions("seed: 1\ndata:\n  path: ../shared/data/lamp/x\n", ".yaml")


def test_no_config_or_bench_default_names_the_held_out_side():
    """Nothing is chosen on held-out: no config under configs/ (nor a bench script's defaults, nor a
    doc's quoted config) draws a held-out seed or reads a held-out directory."""
    files = [*sorted((ROOT / "configs").rglob("*.y*ml")),
             *(p for p in sorted((ROOT / "bench").glob("*.py")) if p.name not in ("suite.py", "suite_table.py"))]
    assert len([f for f in files if f.suffix in (".yaml", ".yml")]) >= 4
    problems = {str(f.relative_to(ROOT)): held_out_mentions(f.read_text(), f.suffix) for f in files}
    assert {k: v for k, v in problems.items() if v} == {}


# ---------------------------------------------------------------- end to end with the tiny model
TINY_SETS = [Dataset("t-dev", "dev", seed=DEV_SEEDS[0], users=4, groups=2, max_profile=6, holdout=1),
             Dataset("t-held", "heldout", seed=HELDOUT_SEEDS[0], users=4, groups=2, max_profile=6, holdout=1,
                     task="LaMP_3")]


@pytest.fixture
def tiny_registry(monkeypatch):
    monkeypatch.setattr(suite, "registry", lambda: list(TINY_SETS))


def _args(out, *more):
    return ["--out", str(out), *[a for o in TINY for a in ("--set", o)], "--threads", "1", *more]


def test_two_cells_end_to_end_tables_carry_the_runs_numbers_and_resume(tmp_path, tiny_registry):
    out = tmp_path / "s"
    assert suite.main(_args(out, "--methods", "proper-central", "--seeds", "0,1")) == 0   # default side: dev only
    results = sorted(p.name for p in (out / "results").glob("*.json"))
    assert results == ["t-dev--proper-central--s0.json", "t-dev--proper-central--s1.json", "t-dev--reference.json"]
    assert not (out / "data" / "heldout").exists()   # the held-out side was not touched
    res = [json.loads((out / "results" / f"t-dev--proper-central--s{s}.json").read_text()) for s in (0, 1)]
    assert all(r["finished"] and r["rc"] == 0 and r["wall_s"] > 0 for r in res)
    assert res[0]["machine"]["cores"] >= 1 and res[0]["machine"]["bf16_used"] is False
    assert res[0]["compute"]["total_passes"] == 3.0 and res[0]["compute"]["examples_seen"] > 0
    # the result's numbers are the run's table.json, and the csv's mean is their mean
    table = json.loads((out / "runs" / "t-dev--proper-central--s0" / "table.json").read_text())
    user_val = next(r for r in table if r["stage"] == "user" and r["split"] == "val")["metrics"]["accuracy"]
    assert res[0]["stages"]["user"]["val"]["accuracy"] == user_val
    rows = list(csv.DictReader((out / "suite.csv").open()))
    row = next(r for r in rows if r["method"] == "proper-central" and r["stage"] == "user" and r["split"] == "val"
               and r["metric"] == "accuracy")
    vals = [r["stages"]["user"]["val"]["accuracy"] for r in res]
    assert row["seeds"] == "2" and float(row["mean"]) == pytest.approx(sum(vals) / 2)
    assert float(row["min"]) == pytest.approx(min(vals)) and float(row["max"]) == pytest.approx(max(vals))
    md = (out / "suite.md").read_text()
    assert "### t-dev (dev; LaMP_2; 2 of 2 cells finished, 0 failed)" in md
    assert "| proper-central | **user** | 2 |" in md
    # the group stage's row carries the runs' group recovery (rounds.jsonl), mean [min, max] over seeds
    aris = [r["groups"]["ari"] for r in res]
    group_row = next(line for line in md.splitlines() if line.startswith("| proper-central | group |"))
    assert f"{sum(aris) / 2:.3f}" in group_row.split(" | ")[-4], group_row
    assert "lookup" in md and "OTHER USERS' LABELS" in md and "Held-out" not in md
    assert (out / "suite.png").stat().st_size > 1000

    # resuming: a finished cell does not run again, its result is not rewritten
    stamp = [(out / "results" / f"t-dev--proper-central--s{s}.json").stat().st_mtime_ns for s in (0, 1)]
    def must_not_run(*a):
        raise AssertionError("a finished cell ran again")
    assert suite.main(_args(out, "--methods", "proper-central", "--seeds", "0,1"), runner=must_not_run) == 0
    assert stamp == [(out / "results" / f"t-dev--proper-central--s{s}.json").stat().st_mtime_ns for s in (0, 1)]

    # a cell cut off mid-run (its run directory, no result) runs again; --only picks it
    calls = []
    def fake(cmd, env, log_path):
        calls.append(cmd)
        return 3
    (out / "runs" / "t-dev--rag--s0").mkdir(parents=True)
    assert suite.main(_args(out, "--only", "t-dev--rag--*"), runner=fake) == 0
    assert len(calls) == 1 and "method=rag" in calls[0] and not (out / "runs" / "t-dev--rag--s0").exists()
    failed = json.loads((out / "results" / "t-dev--rag--s0.json").read_text())
    assert failed["rc"] == 3 and failed["finished"] is False
    # the tables cover the whole plan of the selection (--only picks what runs): 7 seeded methods x 3 + 2 RAGs
    assert "### t-dev (dev; LaMP_2; 2 of 23 cells finished, 1 failed)" in (out / "suite.md").read_text()


def test_a_held_out_rating_cell_federated(tmp_path, tiny_registry):
    """The held-out side runs only when asked; a LaMP_3 draw reports MAE / RMSE, a federated cell
    its own compute note."""
    out = tmp_path / "h"
    assert suite.main(_args(out, "--side", "heldout", "--only", "t-held--proper-fed--s0")) == 0
    r = json.loads((out / "results" / "t-held--proper-fed--s0.json").read_text())
    assert r["finished"] and set(r["stages"]["user"]["test"]) >= {"mae", "rmse"}
    assert r["compute"]["passes"] == {"population": 1.0, "group": 1.0, "user": 1.0}
    assert "sim" in r["command"].split()[1] and "simulation.engine=inprocess" in r["command"]
    assert json.loads((out / "data" / "heldout" / "t-held" / "groups.json").read_text())["task"] == "LaMP_3"
    md = (out / "suite.md").read_text()
    assert "### t-held (heldout; LaMP_3; 1 of 23 cells finished, 0 failed)" in md
    assert "val mae" in md and "Dev side" not in md


def test_table_only_lists_planned_cells_without_running(tmp_path, tiny_registry):
    out = tmp_path / "t"
    def must_not_run(*a):
        raise AssertionError("--table-only ran a cell")
    assert suite.main(_args(out, "--table-only", "--methods", "oppu"), runner=must_not_run) == 0
    assert "### t-dev (dev; LaMP_2; 0 of 3 cells finished, 0 failed)" in (out / "suite.md").read_text()


def test_the_bars_line_reads_the_default_against_the_best_baseline():
    from bench.suite_table import bars

    def row(method, stage, v, split="val", metric="accuracy", ari=None):
        return {"method": method, "stage": stage, "seeds": 3, "values": {(split, metric): (v, v - 0.05, v + 0.05)},
                "ari": None if ari is None else (ari, ari, ari)}
    l2 = Dataset("x", "heldout", seed=101)
    rows = [row("proper-fed", "population", 0.2), row("proper-fed", "group", 0.3, ari=0.42),
            row("proper-fed", "user", 0.4), row("population", "population", 0.25), row("oppu", "user", 0.45),
            row("rag", "rag", 0.1)]
    # stage 3 under OPPU by 5 points, their bands [35, 45] and [40, 50] meet
    assert bars(l2, rows) == ["x", "val accuracy", "3", "20.0", "30.0", "40.0", "yes", "0.42", "oppu 45.0",
                              "within band (-5.0)"]
    rows[4] = row("oppu", "user", 0.55)                 # [50, 60]: apart
    assert bars(l2, rows)[-1] == "no (-15.0)"
    rows[1] = row("proper-fed", "group", 0.45)          # group above user, bands [40, 50] and [35, 45] meet
    assert bars(l2, rows)[6] == "within band"
    rows[1] = row("proper-fed", "group", 0.6)           # group above user, bands apart: not rising
    assert bars(l2, rows)[6] == "no"
    assert bars(l2, rows[:3])[-2:] == ["-", "-"]          # no baseline has run
    assert bars(l2, rows[1:]) is None                     # the default's population stage has not
    # MAE: lower is better, both for "rises" and for the comparison
    l3 = Dataset("r", "heldout", seed=101, task="LaMP_3")
    mae = [row("proper-fed", s, v, metric="mae") for s, v in (("population", 0.9), ("group", 0.8), ("user", 0.7))]
    mae += [row("oppu", "user", 0.6, metric="mae"), row("rag", "rag", 1.1, metric="mae")]
    assert bars(l3, mae)[3:] == ["0.900", "0.800", "0.700", "yes", "-", "oppu 0.600", "within band (-0.100)"]
    mae[3] = row("oppu", "user", 0.5, metric="mae")       # [0.45, 0.55] against stage 3's [0.65, 0.75]
    assert bars(l3, mae)[-1] == "no (-0.200)"
    mae[1] = row("proper-fed", "group", 0.95, metric="mae")   # group worse than population, bands meet
    assert bars(l3, mae)[6] == "within band"
    mae[1] = row("proper-fed", "group", 1.2, metric="mae")    # and apart
    assert bars(l3, mae)[6] == "no"
    mae[1] = row("proper-fed", "group", 0.8, metric="mae")
    mae[3] = row("oppu", "user", 0.75, metric="mae")
    assert bars(l3, mae)[-2:] == ["oppu 0.750", "yes (+0.050)"]
