"""bench.same_numbers tells equal runs from runs one bit apart (hand-made run directories)."""
import json

import torch

from bench.same_numbers import main
from shared.runtime.persist import save_tensors


def write_run(path, value: float, loss: float):
    save_tensors(path / "checkpoint" / "state-0001.safetensors", {"population/w": torch.full((3,), value)})
    (path / "table.json").write_text(json.dumps([{"stage": "user", "metrics": {"accuracy": 0.5}}]))
    rows = [{"kind": "train", "train_loss": loss, "tokens_per_s": 99.0 * value}]
    (path / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_equal_runs_are_identical_and_one_bit_is_found(tmp_path):
    write_run(tmp_path / "a", 1.0, 2.0)
    write_run(tmp_path / "b", 1.0, 2.0)
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    write_run(tmp_path / "c", float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))), 2.0)
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1     # one ulp in one tensor
    write_run(tmp_path / "d", 1.0, 2.5)
    assert main([str(tmp_path / "a"), str(tmp_path / "d")]) == 1     # a loss in rounds.jsonl


def test_timings_are_left_out(tmp_path):
    write_run(tmp_path / "a", 1.0, 2.0)
    write_run(tmp_path / "b", 1.0, 2.0)
    rows = [{"kind": "train", "train_loss": 2.0, "tokens_per_s": 1.0, "seconds": 5.0}]
    (tmp_path / "b" / "rounds.jsonl").write_text(json.dumps(rows[0]))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
