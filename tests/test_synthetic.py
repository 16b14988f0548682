import json

import pytest

from shared.data.lamp import load_lamp
from shared.data.synthetic import theme_of, write_synthetic_lamp


def _truth(d):
    return json.loads((d / "groups.json").read_text())


def test_loads_back_and_sizes_in_bounds(tmp_path):
    d = write_synthetic_lamp(tmp_path / "s", n_users=60, n_groups=3, seed=1, min_profile=3, max_profile=12)
    spec, users = load_lamp(d, holdout=1)
    assert spec.name == "LaMP_2" and len(users) == 60
    sizes = [len(u.train) + len(u.val) for u in users]
    assert min(sizes) >= 3 and max(sizes) <= 12
    # heavy tail: many users at or near the minimum, some at the cap
    assert sizes.count(3) >= 15 and sizes.count(12) >= 1
    assert all(len(u.val) == 1 for u in users)
    truth = _truth(d)
    assert sorted(truth["users"]) == sorted(u.user_id for u in users)
    assert set(truth["users"].values()) == {0, 1, 2}
    assert not list(d.glob("*.tmp"))  # atomic writes leave no temp files behind


def test_deterministic_by_seed(tmp_path):
    a = write_synthetic_lamp(tmp_path / "a", seed=7)
    b = write_synthetic_lamp(tmp_path / "b", seed=7)
    c = write_synthetic_lamp(tmp_path / "c", seed=8)
    for name in ("questions.json", "outputs.json", "groups.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "questions.json").read_bytes() != (c / "questions.json").read_bytes()


def test_tags_follow_group_and_quirks(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=30, n_groups=3, seed=2, quirk_prob=0.3)
    truth = _truth(d)
    _, users = load_lamp(d)
    n_quirky = 0
    for u in users:
        prefs = dict(truth["group_prefs"][str(truth["users"][u.user_id])])
        quirks = truth["quirks"][u.user_id]
        n_quirky += bool(quirks)
        for th, tag in quirks.items():
            assert tag != prefs[th]  # a quirk really departs from the group
        prefs.update(quirks)
        # an oracle that reads the theme from the text and knows group + quirks is always right
        for ex in u.train + u.test:
            th = theme_of(ex.input.split("description: ", 1)[1])
            assert th is not None and prefs[th] == ex.output
    assert 0 < n_quirky < len(users)


def test_no_quirks_means_group_tags(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=10, n_groups=2, seed=3, quirk_prob=0.0)
    truth = _truth(d)
    assert all(q == {} for q in truth["quirks"].values())
    # two users of the same group agree on every theme they both saw
    _, users = load_lamp(d)
    seen = {}
    for u in users:
        g = truth["users"][u.user_id]
        for ex in u.train:
            th = theme_of(ex.input.split("description: ", 1)[1])
            assert seen.setdefault((g, th), ex.output) == ex.output


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_lamp(tmp_path, min_profile=0)
    with pytest.raises(ValueError):
        write_synthetic_lamp(tmp_path, min_profile=10, max_profile=5)
