"""`proper report`: one comparison table, CSV and figures from several run directories."""
import csv
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shared.data.lamp import Example, User
from shared.runtime.config import load_config
from sim.local import run_local
from sim.report_refs import majority_rows, other_users_labels
from sim.report_run import Run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    base = ["data.holdout=1", "eval.splits=[test,val]"]
    run_local(load_config("tiny", base), tmp / "proper")
    data = str(tmp / "proper" / "synthetic_data")
    run_local(load_config("tiny", [*base, f"data.path={data}", "method=mta", "mta.anchor.epochs=1",
                                   "mta.user.epochs=1"]), tmp / "mta")
    return tmp


@pytest.mark.slow  # two whole `proper local` runs (the two_runs fixture)
def test_report_from_two_tiny_runs(two_runs):
    from sim.cli import main
    out = two_runs / "out"
    assert main(["report", str(two_runs / "proper"), str(two_runs / "mta"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Made by: `proper report" in md
    for title in ("bare backbone", "PROPER (centralized): stage 3: user",
                  "MTA (centralized): MTA: merged + stacked LoRA", "most frequent training label overall",
                  "each user's most frequent training label"):
        assert title in md
    assert md.count("| bare backbone |") == 2  # listed once per split, not once per run
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {r["split"] for r in rows} == {"test", "val"}
    by = {(r["row"], r["split"]): r for r in rows}
    user = by[("PROPER (centralized): stage 3: user", "test")]
    assert float(user["bytes_stored_per_user"]) > 0 and float(user["wall_seconds"]) > 0
    assert user["bytes_sent_source"] == "computed" and float(user["bytes_sent_per_client_round_max"]) > 0
    assert float(by[("PROPER (centralized): stage 1: population", "test")]["bytes_stored_per_user"]) == 0
    assert float(user["ci_lo"]) <= float(user["accuracy"]) <= float(user["ci_hi"])
    mta = by[("MTA (centralized): MTA: merged + stacked LoRA", "val")]
    assert 0 < float(mta["bytes_stored_per_user"]) < float(user["bytes_stored_per_user"])
    # the reference points are computed from the same users and split as the runs
    ref = [r for r in rows if r["method"] == "reference" and r["split"] == "val"]
    assert len(ref) == 3 and all(int(r["users"]) == 4 for r in ref)
    for split in ("test", "val"):
        assert (out / f"accuracy_{split}.png").stat().st_size > 1000


def test_majority_baselines_match_the_documented_sample_numbers():
    sample = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp" / "LaMP_2-movie-tagging-subset"
    if not sample.exists():
        pytest.skip("the LaMP-2 sample is not beside this checkout")
    rows = majority_rows(OmegaConf.create({"data": {"path": str(sample), "holdout": 0}}), ["test"])
    acc = [round(r["metrics"]["accuracy"], 3) for r in rows]
    assert acc[:2] == [0.153, 0.361]  # ../shared/data/lamp/SOURCE.md
    assert acc[2] > 0.7  # the sample's movies recur across users with the same tag (docs/results)


def test_lookup_reference_uses_other_users_items_only():
    def ex(i, inp, out):
        return Example(i, "", inp, out)
    a = User("a", [ex("1", "m1", "comedy"), ex("2", "m2", "action")], [], [ex("q", "m1", "?")])
    b = User("b", [ex("3", "m1", "romance"), ex("4", "m1", "romance"), ex("5", "m3", "classic")], [], [])
    pick = other_users_labels([a, b])
    assert pick(a, a.test[0]) == "romance"          # b's label for m1, not a's own "comedy"
    assert pick(b, ex("x", "m1", "?")) == "comedy"  # a's label, not b's own
    assert pick(a, ex("y", "m9", "?")) is None


@pytest.mark.slow  # two whole `proper local` runs (the two_runs fixture)
def test_report_reads_the_wire_audit_of_a_federated_run(two_runs, tmp_path):
    """With wire/*.jsonl present, bytes sent come from the audit, per stage."""
    run = tmp_path / "fed"
    shutil.copytree(two_runs / "proper", run)
    (run / "wire").mkdir()
    replies = [{"message_type": "train.population", "bytes": 100},
               {"message_type": "train.population", "bytes": 300},
               {"message_type": "train.group", "bytes": 1000}, {"message_type": "train.user", "bytes": 0},
               {"message_type": "evaluate", "bytes": 0}]
    (run / "wire" / "replies-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in replies))
    r = Run(run)
    assert r.sent_per_round("population") == (200.0, 300.0, "audit")
    assert r.sent_per_round("group") == (pytest.approx(1400 / 3), 1000.0, "audit")
    assert r.sent_per_round("user") == (350.0, 1000.0, "audit")
