"""bench/attacks.py: the plan's order, the table beside the honest run, and a resumable 2-run sweep
with the tiny model (a real `proper sim` per cell)."""
from __future__ import annotations

import json

from bench.attacks import attackers, main, plan, table


def test_plan_puts_honest_runs_first_and_the_second_share_on_few_aggregations():
    names = [c["name"] for c in plan(("mean", "krum"), ("nan", "scale"), (0.1, 0.2), ("mean",))]
    assert names == ["mean-honest", "krum-honest", "mean-nan-10", "krum-nan-10", "mean-scale-10", "krum-scale-10",
                     "mean-nan-20", "mean-scale-20"]
    assert attackers(10, 0.1) == [0] and attackers(10, 0.2) == [0, 1] and attackers(10, 0.0) == []
    assert attackers(4, 0.1) == [0]   # a share over 0 is at least one client


def test_table_sets_each_cell_beside_its_honest_run_and_lists_what_did_not_run():
    cells = plan(("mean",), ("scale",), (0.1,))
    results = [{**cells[0], "finished": True, "val_accuracy": 0.5, "ari": 0.9, "dropped": 0, "wall_s": 10.0},
               {**cells[1], "finished": False, "val_accuracy": None, "ari": None, "dropped": 0, "wall_s": 3.0}]
    md, rows = table(results, cells + plan(("krum",), ("nan",), (0.1,))[1:])
    assert rows[1]["honest_val_accuracy"] == 0.5 and rows[1]["val_delta"] is None and rows[1]["finished"] is False
    assert "| scale | 10 % | mean | no | - | 50.0 | - |" in md
    assert "| nan | 10 % | krum | not run |" in md
    md, rows = table([{**results[1], "finished": True, "val_accuracy": 0.4}, results[0]], cells)
    assert abs(rows[1]["val_delta"] + 0.1) < 1e-9 and "| -10.0 |" in md


def test_a_two_run_sweep_with_the_tiny_model_resumes_without_running_again(tmp_path):
    args = ["--out", str(tmp_path), "--config", "tiny", "--users", "4", "--groups", "2", "--min-profile", "4",
            "--max-profile", "6", "--holdout", "1", "--aggregations", "mean", "--kinds", "nan",
            "--fractions", "0.25", "--no-group-finding"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "attacks.json").read_text())
    assert [r["name"] for r in rows] == ["mean-honest", "mean-nan-25"]
    honest, nan = rows
    assert honest["finished"] and nan["finished"] and honest["val_questions"] == 4
    assert 0 <= honest["val_accuracy"] <= 1 and honest["ari"] is not None
    assert honest["dropped"] == 0 and nan["dropped"] == 2   # the NaN client: its population and group reply
    assert "| nan | 25 % | mean | yes |" in (tmp_path / "attacks.md").read_text()

    def must_not_run(*a):
        raise AssertionError("a finished cell ran again")
    assert main(args, runner=must_not_run) == 0
