"""Group recovery (shared/evaluation/groups.py): ARI and purity of the users' dominant experts
against the known groups of synthetic users, in `proper local` and from a run's client files."""
import csv
import json
import math
import random

import numpy as np
import pytest

from shared.data.synthetic import write_synthetic_lamp
from shared.evaluation.groups import (
    adjusted_rand_index,
    contingency,
    dominant_experts,
    purity,
    read_user_mixtures,
    run_group_recovery,
    write_user_mixtures,
)

TRUE = [0, 0, 0, 1, 1, 1]
PRED = [0, 0, 1, 1, 2, 2]


def test_perfect_and_relabelled_partitions_score_one():
    assert adjusted_rand_index(TRUE, TRUE) == 1.0 and purity(TRUE, TRUE) == 1.0
    relabelled = [{0: "x", 1: 7}[g] for g in TRUE]  # which expert a group lands on does not matter
    assert adjusted_rand_index(relabelled, TRUE) == 1.0 and purity(relabelled, TRUE) == 1.0


def test_hand_computed_example():
    # contingency [[2, 1, 0], [0, 1, 2]]: pairs together in both 1 + 1 = 2; in TRUE 3 + 3 = 6;
    # in PRED 1 + 1 + 1 = 3; of all 15 pairs. expected = 6 * 3 / 15 = 1.2, max = (6 + 3) / 2 = 4.5
    # ARI = (2 - 1.2) / (4.5 - 1.2) = 8 / 33
    assert contingency(TRUE, PRED).tolist() == [[2, 1, 0], [0, 1, 2]]
    assert adjusted_rand_index(PRED, TRUE) == pytest.approx(8 / 33)
    assert adjusted_rand_index(TRUE, PRED) == pytest.approx(8 / 33)  # symmetric
    # clusters 0 and 2 are pure (2 + 2 users), cluster 1 holds one user of each group (1)
    assert purity(PRED, TRUE) == pytest.approx(5 / 6)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)  # sklearn's docstring example


def test_random_assignment_scores_about_zero():
    rng = random.Random(0)
    experts = [rng.randrange(5) for _ in range(3000)]
    groups = [rng.randrange(3) for _ in range(3000)]
    assert abs(adjusted_rand_index(experts, groups)) < 0.01
    # purity does not correct for chance: random clusters still get the largest group's share
    assert purity(experts, groups) == pytest.approx(max(np.bincount(groups)) / 3000, abs=0.03)


def test_degenerate_partitions():
    assert adjusted_rand_index([3, 3, 3], [1, 1, 1]) == 1.0   # everyone together in both
    assert adjusted_rand_index([0, 1, 2], [5, 6, 7]) == 1.0   # everyone apart in both
    assert adjusted_rand_index([0, 0, 0, 0], [0, 0, 1, 1]) == 0.0
    assert math.isnan(adjusted_rand_index([], [])) and math.isnan(purity([], []))
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0])


def test_matches_sklearn_where_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    for n in (2, 5, 40, 300):
        a = [rng.randrange(4) for _ in range(n)]
        b = [rng.randrange(3) for _ in range(n)]
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(b, a))


def test_dominant_expert_averages_over_layers():
    # user 0 prefers expert 0 in two layers of three, yet expert 1 on average (0.43 against 0.57)
    mix = np.array([[[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]],
                    [[0.2, 0.8], [0.3, 0.7], [0.5, 0.5]]])
    assert dominant_experts(mix).tolist() == [1, 1]
    assert dominant_experts(mix[:, :2]).tolist() == [0, 1]


def test_mixture_file_round_trip_leaves_out_users_without_tokens(tmp_path):
    mix = np.array([[[0.7, 0.3]], [[np.nan, np.nan]], [[0.2, 0.8]]])
    write_user_mixtures(tmp_path, ["a", "b", "c"], mix, server_round=2)
    back = read_user_mixtures(tmp_path / "mixtures.csv")
    assert sorted(back) == ["a", "c"]
    assert back["c"] == {"round": 2, "expert": 1, "mixture": [0.2, 0.8]}


def _fake_sim_run(root, experts: dict, groups: dict):
    """A run directory as `proper sim` leaves it: config.yaml, the data, clients/*/mixtures.csv."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "groups.json").write_text(json.dumps({"users": groups}))
    run = root / "run"
    (run / "clients").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  path: {data}\n")
    for i, uid in enumerate(sorted(experts)):
        mix = np.full((1, 2, 3), 0.1)
        mix[0, :, experts[uid]] = 0.8
        write_user_mixtures(run / "clients" / f"{i:05d}", [uid], mix, server_round=3)
    return run


def test_run_group_recovery_reads_every_clients_file(tmp_path):
    groups = {"u0": 0, "u1": 0, "u2": 1, "u3": 1, "u4": 2}
    run = _fake_sim_run(tmp_path, {"u0": 2, "u1": 2, "u2": 0, "u3": 0, "u4": 1}, groups)
    rec = run_group_recovery(run)
    assert rec == {"ari": 1.0, "purity": 1.0, "users": 5, "experts_used": 3, "round": 3}
    (tmp_path / "data" / "groups.json").unlink()  # real LaMP data: no known groups, nothing to measure
    assert run_group_recovery(run) is None


@pytest.mark.slow  # a whole `proper local` run on the tiny model (about 20 s)
def test_proper_local_reports_group_recovery_on_synthetic_headlines(tmp_path, proper):
    data = write_synthetic_lamp(tmp_path / "data", n_users=6, n_groups=2, seed=0, task="LaMP_4",
                                min_profile=2, max_profile=4)
    out = proper("local", "-c", "tiny", f"output.dir={tmp_path}", "output.name=run", f"data.path={data}")
    assert out.code == 0, out.err
    run = tmp_path / "run"
    # each user's mixture, privately in the client's state directory
    rows = list(csv.DictReader((run / "client_state" / "mixtures.csv").open()))
    assert sorted(r["user"] for r in rows) == [f"u{i:04d}" for i in range(6)]
    assert all(r["round"] == "1" and 0 <= int(r["expert"]) < 5 for r in rows)
    assert all(sum(float(r[f"p{e}"]) for e in range(5)) == pytest.approx(1.0, abs=1e-4) for r in rows)
    # the table's notes and rounds.jsonl carry the measure, per_user.csv the dominant experts
    assert "group recovery after group round 1: adjusted Rand index" in (run / "table.md").read_text()
    rec = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    rec = [r for r in rec if r["kind"] == "groups"]
    assert len(rec) == 1 and rec[0]["users"] == 6 and -1 <= rec[0]["ari"] <= 1 and 0 < rec[0]["purity"] <= 1
    per_user = {r["user"]: r for r in csv.DictReader((run / "per_user.csv").open())}
    assert {u: int(r["expert"]) for u, r in per_user.items()} == {r["user"]: int(r["expert"]) for r in rows}
    assert list(per_user["u0000"])[-1] == "expert"
    # the same measure from the client files, as run after a federated run
    assert run_group_recovery(run) == {**{k: rec[0][k] for k in ("ari", "purity", "users", "experts_used")},
                                       "round": 1}
