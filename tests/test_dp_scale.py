"""bench/dp_scale.py (issue 34's study at scale) end to end with the tiny random model: the runs
carry the noise the accountant asks for a target epsilon and spend no more, every privacy level
meets the same sampled users, the audit measures those users, the tables carry the runs' numbers,
and a finished study resumes without running anything again."""
from __future__ import annotations

import json

import pytest

import bench.dp_scale as study

TINY = ["model.name=tiny", "train.bf16=false", "train.max_len=96", "population.rounds=1", "group.rounds=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_scale")
    argv = ["--out", str(out), "--users", "6", "--levels", "none,clip,8", "--per-round", "3", "--eval-users", "2",
            "--min-profile", "3", "--max-profile", "5", "--canaries", "1", "--audit", "--threads", "1"]
    argv += [x for o in TINY for x in ("--set", o)]
    assert study.main(argv) == 0
    return out, argv


def test_each_level_runs_with_the_accountants_noise_and_spends_at_most_its_target(finished):
    from server.privacy import noise_for
    out, _ = finished
    res = {r["level"]: r for r in (json.loads(p.read_text()) for p in (out / "results").glob("*.json"))}
    assert set(res) == {"none", "clip", "8"} and all(r["rc"] == 0 for r in res.values())
    assert res["none"]["privacy"]["dp"] is False and res["none"]["clip"] is None
    z = noise_for(8.0, 2, 3, 6, 1 / 6)                  # 2 releases (one population, one group round), q = 3/6
    p = res["8"]["privacy"]
    assert p["dp"] and p["noise_multiplier"] == pytest.approx(z, rel=1e-3) and p["delta"] == pytest.approx(1 / 6)
    assert p["clip"] == 1.0
    # the run's own account: within the target, and not far under it (the z is the smallest that fits;
    # a Poisson draw that came back empty is a release too, so the count of rounds is the planned one)
    assert 6.0 < p["epsilon"] <= 8.0 + 1e-6
    assert res["clip"]["privacy"]["noise_multiplier"] == 0 and res["clip"]["privacy"]["epsilon"] == float("inf")
    for r in res.values():                              # 2 of 6 users evaluated, the same 2 at every level
        assert r["stages"]["user"]["val"]["users"] == 2 and r["stages"]["population"]["test"]["users"] == 2
        assert r["audit"]["population"]["users"] == 2   # membership measured on the sample
    runs = out / "runs"
    sampled = {lv: sorted(p.name for p in (runs / f"dev-N6--{lv}--s0").rglob("*.user")) for lv in res}
    assert len(sampled["none"]) == 2 and sampled["none"] == sampled["clip"] == sampled["8"]


def test_the_table_carries_the_runs_numbers_and_a_finished_study_resumes(finished):
    out, argv = finished
    md = (out / "dp_scale.md").read_text()
    r = json.loads((out / "results" / "dev-N6--8--s0.json").read_text())
    user_val = 100 * r["stages"]["user"]["val"]["accuracy"]
    row = next(line for line in md.splitlines() if line.startswith("| 8 |"))
    assert f"| {user_val:.1f} |" in row and f"{r['privacy']['epsilon']:.3g} (0.17)" in row
    lines = [line for line in md.splitlines() if line.startswith("| ") and "level" not in line]
    assert [line.split(" | ")[0] for line in lines] == ["| none", "| clip", "| 8"]   # ordered weakest to strongest
    assert [line.split(" | ")[1] for line in lines] == ["-", "1", "1"]               # the clip norm C
    assert (out / "dp_scale.csv").is_file() and (out / "val_vs_epsilon.png").is_file()
    assert (out / "exposure_vs_epsilon.png").is_file()
    called = []
    assert study.main(argv, runner=lambda *a: called.append(a) or 0) == 0
    assert called == []                                  # every cell has its result


def test_levels_are_checked():
    assert study.parse_levels("none, clip,8,0.5") == ["none", "clip", "8", "0.5"]
    with pytest.raises(ValueError):
        study.parse_levels("none,eight")


def test_a_cell_with_another_clip_norm_is_another_cell():
    assert study.cell_name("dev", 1000, "8", 0) == "dev-N1000--8--s0"
    assert study.cell_name("dev", 1000, "8", 0, 6.0) == "dev-N1000--8-C6--s0"
    assert study.cell_name("dev", 1000, "none", 0, 6.0) == "dev-N1000--none--s0"   # no DP: no clip


def test_a_level_run_with_several_seeds_is_read_as_a_band():
    def result(level, seed, user_val, clip=None):
        return {"level": level, "seed": seed, "rc": 0, "clip": clip,
                "stages": {"user": {"val": {"accuracy": user_val}}}}
    group = [result("none", s, v) for s, v in ((0, 0.18), (1, 0.22), (2, 0.20))]
    group += [result("8", 0, 0.19, clip=4.0), result("3", 0, 0.10, clip=4.0), result("3", 1, 0.14, clip=4.0)]
    group.append({**result("none", 3, 0.99), "rc": 1})          # a failed run is no part of a band
    lines = study.band_lines(group)
    assert lines[0] == "- stage-3 val over seeds 0, 1, 2: none 20.0 [18.0, 22.0]"
    assert lines[1] == "- stage-3 val over seeds 0, 1: 3 (C 4) 12.0 [10.0, 14.0]"
    assert len(lines) == 3 and lines[2] == ""                     # the one-seed level has no band line


def test_finished_runs_are_audited_afterwards_into_their_results(finished):
    """--audit-only: no run again; the audit (here with 3 candidates a canary) goes into the result.
    A result written while rc still carried the audit's status (a stopped audit) gets the run's own
    status back from its finished table."""
    out, argv = finished
    path = out / "results" / "dev-N6--none--s0.json"
    old = json.loads(path.read_text())
    legacy = {k: v for k, v in old.items() if k != "audit_rc"}
    path.write_text(json.dumps({**legacy, "rc": -15, "audit": None}))
    ran = []

    def runner(cmd, env, log):
        ran.append(cmd)
        from bench.common import run_logged
        return run_logged(cmd, env, log)
    keep = [a for a in argv if a not in ("--audit",)]
    keep[keep.index("--levels") + 1] = "none"
    assert study.main([*keep, "--audit-only", "--audit-candidates", "3"], runner=runner) == 0
    assert len(ran) == 1 and ran[0][-4:] == ["audit", str(out / "runs" / "dev-N6--none--s0"), "--candidates", "3"]
    res = json.loads(path.read_text())
    assert res["rc"] == 0 and res["audit_rc"] == 0 and res["audit_s"] > 0
    assert res["audit"]["population"]["users"] == 2
    assert json.loads((out / "runs" / "dev-N6--none--s0" / "audit.json").read_text())["candidates"] == 3
    assert res["stages"] == old["stages"] and res["wall_s"] == old["wall_s"]   # the run's record kept
