"""bench/enroll_spread.py's split of a LaMP set into the run's users and the users enrolled later."""
from __future__ import annotations

import json

from bench.enroll_spread import split_users
from shared.data.lamp import load_lamp
from shared.data.synthetic import write_synthetic_lamp


def test_split_users_keeps_every_record_once(tmp_path):
    src = tmp_path / "syn"
    write_synthetic_lamp(src, n_users=8, n_groups=2, seed=3)
    new = split_users(src, tmp_path / "run", tmp_path / "new", k=3, seed=0)
    assert len(new) == 3 and new == split_users(src, tmp_path / "run2", tmp_path / "new2", k=3, seed=0)
    _, run_users = load_lamp(tmp_path / "run")
    _, new_users = load_lamp(tmp_path / "new")
    assert sorted(u.user_id for u in new_users) == new
    assert not {u.user_id for u in run_users} & set(new)
    q = json.loads((src / "questions.json").read_text())
    parts = [json.loads((tmp_path / d / "questions.json").read_text()) for d in ("run", "new")]
    def dumped(records):
        return sorted(json.dumps(r, sort_keys=True) for r in records)
    assert dumped(q) == dumped(r for p in parts for r in p)
    for d in ("run", "new"):   # every question keeps its gold
        ids = {str(r["id"]) for r in json.loads((tmp_path / d / "questions.json").read_text())}
        golds = {str(g["id"]) for g in json.loads((tmp_path / d / "outputs.json").read_text())["golds"]}
        assert ids == golds
