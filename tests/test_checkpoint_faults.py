"""The checkpoint under faults (in-process engine, tiny model): a corrupt or truncated checkpoint on
--resume is one clear error naming the file, with nothing overwritten; a full disk while a
checkpoint is written stops the run with the previous checkpoint intact, and --resume continues."""
import errno
import logging

import pytest

import server.checkpoint
from sim.cli import main

RUN = ["sim", "-c", "tiny", "simulation.engine=inprocess", "eval.stages=[user]", "eval.splits=[test]"]


@pytest.fixture
def crashed(tmp_path):
    """A run stopped right after group:1 (debug.crash_after): its checkpoint lists three steps."""
    assert main([*RUN, f"output.dir={tmp_path}", "output.name=run", "debug.crash_after=group:1"]) == 1
    return tmp_path / "run"


def snapshot(run):
    return {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}


@pytest.mark.parametrize("damage, named", [
    ("truncate-tensors", "state-"),
    ("truncate-progress", "progress.json"),
    ("garbage-progress", "progress.json"),
])
def test_a_damaged_checkpoint_is_refused_on_resume_naming_the_file(crashed, capsys, damage, named):
    ckpt = crashed / "checkpoint"
    target = next(ckpt.glob("state-*.safetensors")) if damage == "truncate-tensors" else ckpt / "progress.json"
    data = target.read_bytes()
    target.write_bytes(b"[1, 2" if damage == "garbage-progress" else data[: len(data) // 2])
    before = snapshot(crashed)
    capsys.readouterr()
    assert main(["sim", "--resume", str(crashed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0] and "corrupt" in err[0], err
    assert snapshot(crashed) == before and not (crashed / "table.md").exists()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    real, calls = server.checkpoint.save_tensors, []

    def full_disk(path, tensors, metadata=None):
        calls.append(path.name)
        if len(calls) == 3:   # the third checkpoint (after the user stage) finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(server.checkpoint, "save_tensors", full_disk)
    caplog.set_level(logging.ERROR, logger="proper.sim")
    assert main([*RUN, f"output.dir={tmp_path}", "output.name=full"]) == 1
    assert any("No space left on device" in r.getMessage() for r in caplog.records)
    progress, parts = server.checkpoint.Checkpoint(tmp_path / "full").load()
    assert progress["done"] == ["population:1", "group:1"]   # the last checkpoint that was written
    assert parts["population"] is not None and not list((tmp_path / "full" / "checkpoint").glob(".state-*"))
    monkeypatch.setattr(server.checkpoint, "save_tensors", real)
    assert main(["sim", "--resume", str(tmp_path / "full")]) == 0
    assert (tmp_path / "full" / "table.md").exists()
