"""`proper`'s errors: a mistake in the input is one line on stderr and status 2, a bug a traceback."""
import re

import pytest

from shared.runtime.config import ConfigError


def local(proper, tmp_path, *overrides):
    return proper("local", "-c", "tiny", f"output.dir={tmp_path / 'runs'}", *overrides)


def assert_one_error_line(outcome, *fragments):
    assert outcome.code == 2
    assert len(outcome.err) == 1 and outcome.err[0].startswith("error: "), outcome.err
    for fragment in fragments:
        assert fragment in outcome.err[0]
    return outcome.err[0]


def test_bad_data_is_one_line_naming_the_file(proper, tmp_path, bad_lamp):
    data, pattern = bad_lamp
    line = assert_one_error_line(local(proper, tmp_path, f"data.path={data}"), str(data))
    assert re.search(pattern, line), line
    assert re.search(r"(questions|outputs)\.json", line)


def test_bad_config_value(proper, tmp_path):
    assert_one_error_line(local(proper, tmp_path, "train.bf16=fast"), "train.bf16", "'fast'")


def test_resume_without_a_run_directory(proper):
    assert_one_error_line(proper("sim", "--resume", "/nonexistent"), "--resume /nonexistent", "not a run directory")


def test_report_of_a_missing_run(proper, tmp_path):
    missing = tmp_path / "no-such-run"
    assert_one_error_line(proper("report", missing, "--out", tmp_path / "out"), str(missing))


def test_a_deployment_command_exiting_with_a_message(proper, tmp_path):
    assert_one_error_line(proper("split", "--data", tmp_path / "nothing", "--clients", "2", "--out", tmp_path),
                          str(tmp_path / "nothing"))


@pytest.mark.parametrize("argv", [["--debug", "sim"], ["sim", "--debug"]])
def test_debug_shows_the_traceback(proper, argv):
    with pytest.raises(ConfigError, match="not a run directory"):
        proper(*argv, "--resume", "/nonexistent")


def test_a_bug_keeps_its_traceback(proper, tmp_path, monkeypatch):
    import sim.local

    def broken(cfg, run_path):
        raise KeyError("a bug, not the user's mistake")
    monkeypatch.setattr(sim.local, "run_local", broken)
    with pytest.raises(KeyError, match="a bug"):
        local(proper, tmp_path)
