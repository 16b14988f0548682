import json

import pytest

from shared.data.lamp import load_lamp
from shared.data.synthetic import (
    STYLES,
    TOPICS,
    SyntheticArgumentError,
    headline,
    style_of,
    theme_of,
    topic_of,
    write_synthetic_lamp,
)


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


# ---------------------------------------------------------------- LaMP_4: headlines in each group's style
def _headlines(d):
    """(user, article, headline) of every profile item and question, as the reader loads them."""
    _, users = load_lamp(d)
    return [(u.user_id, ex.input.split("article: ", 1)[1], ex.output) for u in users for ex in u.train + u.test]


def test_lamp4_loads_back_with_the_reader_and_groups_match(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=24, n_groups=4, seed=1, task="LaMP_4", max_profile=12)
    spec, users = load_lamp(d, holdout=1)
    assert spec.name == "LaMP_4" and len(users) == 24
    raw = json.loads((d / "questions.json").read_text())
    assert set(raw[0]["profile"][0]) == {"id", "text", "title"}  # LaMP_4's own profile fields
    assert raw[0]["input"].startswith("Generate a headline for the following article: ")
    assert json.loads((d / "outputs.json").read_text())["task"] == "LaMP_4"
    truth = _truth(d)
    assert truth["task"] == "LaMP_4"
    assert sorted(truth["users"]) == sorted(u.user_id for u in users)
    assert set(truth["users"].values()) == {0, 1, 2, 3}
    # short articles: with the prompt they stay far below the SmolLM configs' 160 tokens
    assert max(len(ex.input.split()) for u in users for ex in u.train + u.val + u.test) <= 45


def test_lamp4_headlines_follow_group_style_and_quirks(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=30, n_groups=3, seed=2, task="LaMP_4", quirk_prob=0.3)
    truth = _truth(d)
    styles = {str(g): set(p.values()) for g, p in truth["group_prefs"].items()}
    assert all(len(s) == 1 for s in styles.values())  # one style per group ...
    assert len(set.union(*styles.values())) == 3        # ... and no two groups alike
    n_quirky = 0
    for uid, article, title in _headlines(d):
        prefs = dict(truth["group_prefs"][str(truth["users"][uid])])
        prefs.update(truth["quirks"][uid])
        n_quirky += bool(truth["quirks"][uid])
        # an oracle reading the topic from the article, knowing group and quirks, names the style
        topic = topic_of(article)
        assert topic is not None and style_of(title) == prefs[topic]
        assert headline(prefs[topic], topic, _key_phrase(article)) == title
    assert n_quirky > 0


def _key_phrase(article: str) -> str:
    # "<day>, the <key phrase> after <reason>. ..."
    return article.split(", the ", 1)[1].split(" after ", 1)[0]


def test_lamp4_group_headlines_share_their_wording(tmp_path):
    """Without quirks a group's headlines all carry the same fixed words, other groups' do not:
    what ROUGE rewards a model for learning from a user's group."""
    d = write_synthetic_lamp(tmp_path, n_users=12, n_groups=3, seed=4, task="LaMP_4", quirk_prob=0.0)
    truth = _truth(d)
    by_group = {}
    for uid, _, title in _headlines(d):
        by_group.setdefault(truth["users"][uid], set()).add(style_of(title))
    assert all(len(s) == 1 for s in by_group.values()) and len(set.union(*by_group.values())) == 3


def test_lamp4_deterministic_by_seed(tmp_path):
    a = write_synthetic_lamp(tmp_path / "a", seed=7, task="LaMP_4")
    b = write_synthetic_lamp(tmp_path / "b", seed=7, task="lamp-4")  # spelt as the reader accepts it
    c = write_synthetic_lamp(tmp_path / "c", seed=8, task="LaMP_4")
    for name in ("questions.json", "outputs.json", "groups.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "questions.json").read_bytes() != (c / "questions.json").read_bytes()


def test_every_style_parses_back_to_itself_only():
    for style in STYLES:
        for topic in TOPICS:
            assert style_of(headline(style, topic, "city council approves new budget")) == style


def test_uniform_history_sizes(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=200, seed=5, min_profile=3, max_profile=30, size_law="uniform")
    sizes = [len(u.train) for u in load_lamp(d)[1]]
    assert min(sizes) == 3 and max(sizes) == 30 and 13 < sum(sizes) / len(sizes) < 20  # mean 16.5
    # no pile-up at the minimum: the Pareto law (shape 1.5) puts about 35 % of users there
    assert sizes.count(3) < 20


def test_bad_task_and_size_law(tmp_path):
    with pytest.raises(SyntheticArgumentError, match="LaMP_2, LaMP_3, LaMP_4, LaMP_5"):
        write_synthetic_lamp(tmp_path, task="LaMP_7")
    with pytest.raises(SyntheticArgumentError, match="size_law"):
        write_synthetic_lamp(tmp_path, size_law="zipf")
    with pytest.raises(SyntheticArgumentError, match="n_groups must be <= 8"):
        write_synthetic_lamp(tmp_path, task="LaMP_4", n_groups=9)
    with pytest.raises(SyntheticArgumentError, match="LaMP_5 has 8 styles"):
        write_synthetic_lamp(tmp_path, task="LaMP_5", n_groups=9)


def test_proper_synth_writes_lamp4(tmp_path):
    from sim.cli import main
    assert main(["synth", "--out", str(tmp_path), "--users", "5", "--task", "LaMP_4", "--size-law", "uniform"]) == 0
    assert load_lamp(tmp_path)[0].name == "LaMP_4" and _truth(tmp_path)["task"] == "LaMP_4"


# ---------------------------------------------------------------- draws of the code before LaMP_3 / LaMP_5 / fixed
# sha256 of questions.json + outputs.json + groups.json, computed on the code before the LaMP_3 and
# LaMP_5 families and size_law "fixed" were added (commit c9c0427): adding them changed no earlier draw
BEFORE = {("LaMP_2", "pareto"): "669f5ad414af26923647863943f2ec5580752a2ad7fa6dfe89cec8abd21f935d",
          ("LaMP_2", "uniform"): "3081a066c1a6eb3cb476de8c14981c1224261a8ad43d2184a87e254226d6b967",
          ("LaMP_4", "pareto"): "15f7a920eabe3cec7500a1cecb355dc8369bc747023778147a8170845f13fef9",
          ("LaMP_4", "uniform"): "33b298ba4d66f824fd8dda8f1edc2c9252a5285c2f3eb84b5f628166cf90c934"}


@pytest.mark.parametrize("task,law", sorted(BEFORE))
def test_earlier_draws_are_byte_identical(tmp_path, task, law):
    import hashlib
    d = write_synthetic_lamp(tmp_path, n_users=30, n_groups=3, seed=11, task=task, size_law=law)
    h = hashlib.sha256()
    for name in ("questions.json", "outputs.json", "groups.json"):
        h.update((d / name).read_bytes())
    assert h.hexdigest() == BEFORE[(task, law)]


def test_fixed_size_law_gives_every_user_min_profile_items(tmp_path):
    d = write_synthetic_lamp(tmp_path, n_users=25, seed=3, min_profile=3, size_law="fixed")
    raw = json.loads((d / "questions.json").read_text())
    assert [len(q["profile"]) for q in raw] == [3] * 25
    assert all(len(u.train) == 2 and len(u.val) == 1 for u in load_lamp(d, holdout=1)[1])


# ---------------------------------------------------------------- LaMP_3: ratings by group and category
def test_lamp3_loads_back_and_scores_follow_group_and_quirks(tmp_path):
    from shared.data.synthetic_tasks import category_of
    d = write_synthetic_lamp(tmp_path, n_users=30, n_groups=3, seed=2, task="LaMP_3", quirk_prob=0.3,
                             max_profile=12)
    spec, users = load_lamp(d, holdout=1)
    assert spec.name == "LaMP_3" and spec.kind == "rating" and spec.metrics == ["mae", "rmse"]
    raw = json.loads((d / "questions.json").read_text())
    assert set(raw[0]["profile"][0]) == {"id", "text", "score"}   # LaMP_3's own profile fields
    assert raw[0]["input"].startswith("What is the score of the following review on a scale of 1 to 5?")
    assert json.loads((d / "outputs.json").read_text())["task"] == "LaMP_3"
    truth = _truth(d)
    assert truth["task"] == "LaMP_3" and set(truth["users"].values()) == {0, 1, 2}
    # the groups differ: some category two groups score differently
    prefs = truth["group_prefs"]
    assert any(len({prefs[g][c] for g in prefs}) > 1 for c in prefs["0"])
    n_quirky = 0
    for u in users:
        p = dict(prefs[str(truth["users"][u.user_id])])
        p.update(truth["quirks"][u.user_id])
        n_quirky += bool(truth["quirks"][u.user_id])
        for ex in u.train + u.val + u.test:   # an oracle knowing category, group and quirks is always right
            category = category_of(ex.input.split("review: ", 1)[1])
            assert category is not None and ex.output == p[category] and ex.output in spec.labels
    assert n_quirky > 0


def test_lamp3_oracle_scores_zero_mae(tmp_path):
    from shared.data.tasks import task_spec
    from shared.evaluation.metrics import example_stats, stats_metrics
    d = write_synthetic_lamp(tmp_path, n_users=8, seed=5, task="LaMP_3")
    spec, users = load_lamp(d)
    golds = [ex.output for u in users for ex in u.test]
    assert stats_metrics(task_spec("LaMP_3"), example_stats(spec, golds, golds)) == {"mae": 0.0, "rmse": 0.0}
    off = [str(min(5, int(g) + 1)) if g != "5" else "4" for g in golds]   # one point off everywhere
    assert stats_metrics(spec, example_stats(spec, off, golds)) == {"mae": 1.0, "rmse": 1.0}


# ---------------------------------------------------------------- LaMP_5: paper titles in each group's style
def test_lamp5_loads_back_and_titles_follow_group_style_and_quirks(tmp_path):
    from shared.data.synthetic_tasks import field_of, paper_style_of, paper_title
    d = write_synthetic_lamp(tmp_path, n_users=30, n_groups=3, seed=2, task="LaMP_5", quirk_prob=0.3,
                             max_profile=12)
    spec, users = load_lamp(d, holdout=1)
    assert spec.name == "LaMP_5" and spec.kind == "generation"
    raw = json.loads((d / "questions.json").read_text())
    assert set(raw[0]["profile"][0]) == {"id", "abstract", "title"}   # LaMP_5's own profile fields
    assert raw[0]["input"].startswith("Generate a title for the following abstract of a paper: ")
    truth = _truth(d)
    styles = {g: set(p.values()) for g, p in truth["group_prefs"].items()}
    assert all(len(s) == 1 for s in styles.values()) and len(set.union(*styles.values())) == 3
    n_quirky = 0
    for u in users:
        p = dict(truth["group_prefs"][str(truth["users"][u.user_id])])
        p.update(truth["quirks"][u.user_id])
        n_quirky += bool(truth["quirks"][u.user_id])
        for ex in u.train + u.val + u.test:
            text = ex.input.split("abstract of a paper: ", 1)[1]
            field = field_of(text)
            phrase = text.split("We propose ", 1)[1].split(". ", 1)[0]
            assert field is not None and paper_style_of(ex.output) == p[field]
            assert paper_title(p[field], field, phrase) == ex.output
    assert n_quirky > 0
    # short abstracts: with the prompt they stay far below the SmolLM configs' 160 tokens
    assert max(len(ex.input.split()) for u in users for ex in u.train + u.val + u.test) <= 45


def test_every_paper_style_parses_back_to_itself_only():
    from shared.data.synthetic_tasks import FIELDS, PAPER_STYLES, paper_style_of, paper_title
    for style in PAPER_STYLES:
        for field in FIELDS:
            assert paper_style_of(paper_title(style, field, "graph attention for protein folding")) == style


@pytest.mark.parametrize("task", ["LaMP_3", "LaMP_5"])
def test_new_families_deterministic_by_seed(tmp_path, task):
    a = write_synthetic_lamp(tmp_path / "a", seed=7, task=task)
    b = write_synthetic_lamp(tmp_path / "b", seed=7, task=task)
    c = write_synthetic_lamp(tmp_path / "c", seed=8, task=task)
    for name in ("questions.json", "outputs.json", "groups.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "questions.json").read_bytes() != (c / "questions.json").read_bytes()


def test_proper_synth_new_tasks_and_sizes(tmp_path):
    from sim.cli import main
    for task in ("LaMP_3", "LaMP_5"):
        out = tmp_path / task
        assert main(["synth", "--out", str(out), "--users", "6", "--task", task, "--size-law", "fixed",
                     "--min-profile", "3", "--groups", "2"]) == 0
        assert load_lamp(out)[0].name == task and _truth(out)["n_groups"] == 2
        assert [len(q["profile"]) for q in json.loads((out / "questions.json").read_text())] == [3] * 6
    out = tmp_path / "u"
    assert main(["synth", "--out", str(out), "--users", "40", "--size-law", "uniform", "--min-profile", "5",
                 "--max-profile", "7"]) == 0
    assert {len(q["profile"]) for q in json.loads((out / "questions.json").read_text())} == {5, 6, 7}
