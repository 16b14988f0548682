import json
from collections import Counter
from pathlib import Path

import pytest

from shared.data.lamp import MOVIE_TAGS, LampDataError, load_lamp, plain_tweet, profile_to_example, task_spec
from shared.evaluation.metrics import accuracy
from tests.lamp_files import lamp_question, write_lamp

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/lamp/LaMP_2-movie-tagging-subset"
LAMP2_HEAD = ("Which tag does this movie relate to among the following tags? Just answer with the "
              "tag name without further explanation. tags: [sci-fi, based on a book, comedy, action, "
              "twist ending, dystopia, dark comedy, classic, psychology, fantasy, romance, "
              "thought-provoking, social commentary, violence, true story] description: ")

needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="real LaMP sample not present")


# ----------------------------------------------------------------------------- real sample

@needs_sample
def test_real_sample_shape():
    spec, users = load_lamp(SAMPLE)
    assert spec.name == "LaMP_2" and spec.kind == "label" and spec.labels == MOVIE_TAGS
    assert len(users) == 72
    assert all(len(u.train) == 10 and u.val == [] and len(u.test) == 1 for u in users)
    first = users[0]
    assert first.user_id == "8000002"  # the "user_id" field wins over the question id
    ex = first.train[0]
    assert ex.input.startswith(LAMP2_HEAD)
    assert ex.output == "twist ending"
    # the test prompt is the question verbatim, and the same template as the training prompts
    q0 = json.loads((SAMPLE / "questions.json").read_text())[0]
    assert first.test[0].input == q0["input"].strip() and first.test[0].input.startswith(LAMP2_HEAD)
    assert first.test[0].id == "102" and first.test[0].output == "twist ending"


@needs_sample
def test_real_sample_holdout_and_questions_path():
    _, users = load_lamp(SAMPLE / "questions.json", holdout=2)
    u = users[0]
    assert len(u.train) == 8 and len(u.val) == 2
    _, plain = load_lamp(SAMPLE)
    # holdout takes the last items in file order
    assert [e.output for e in u.train + u.val] == [e.output for e in plain[0].train]
    assert u.val[-1].id == plain[0].train[-1].id


@needs_sample
def test_real_sample_reference_points():
    spec, users = load_lamp(SAMPLE)
    golds = [u.test[0].output for u in users]
    own = [Counter(e.output for e in u.train).most_common(1)[0][0] for u in users]
    overall = Counter(e.output for u in users for e in u.train).most_common(1)[0][0]
    assert round(100 * accuracy(own, golds), 1) == 36.1
    assert round(100 * accuracy([overall] * len(users), golds), 1) == 15.3


@needs_sample
def test_task_given_must_agree(tmp_path):
    spec, _ = load_lamp(SAMPLE, task="LaMP_2M")  # alias of the file's task: fine
    assert spec.name == "LaMP_2"
    with pytest.raises(LampDataError, match="outputs.json.*LaMP_3"):
        load_lamp(SAMPLE, task="LaMP_3")


# ----------------------------------------------------------------------------- small files

def test_longest_and_max_users(tmp_path):
    qs = [lamp_question("a", 3), lamp_question("b", 5), lamp_question("c", 2), lamp_question("d", 5)]
    d = write_lamp(tmp_path, qs, [{"id": q["id"], "output": "comedy"} for q in qs])
    _, first2 = load_lamp(d, max_users=2)
    assert [u.user_id for u in first2] == ["a", "b"]
    _, long3 = load_lamp(d, max_users=3, longest=True)
    assert [u.user_id for u in long3] == ["b", "d", "a"]  # ties keep file order


def test_holdout_leaves_one_to_train(tmp_path):
    d = write_lamp(tmp_path, [lamp_question("a", 2)], [{"id": "a", "output": "comedy"}])
    _, users = load_lamp(d, holdout=5)
    assert len(users[0].train) == 1 and len(users[0].val) == 1


def test_bad_inputs(bad_lamp):
    data, pattern = bad_lamp
    with pytest.raises(LampDataError, match=pattern) as err:
        load_lamp(data)
    assert str(data) in str(err.value)  # the full path, not just the file name


def test_task_spec():
    assert task_spec("LaMP_2M").name == "LaMP_2"
    assert task_spec("lamp-2n").labels[0] == "travel" and len(task_spec("LaMP_2N").labels) == 15
    assert task_spec("LaMP_3").kind == "rating" and task_spec("LaMP_7").kind == "generation"
    with pytest.raises(LampDataError, match="LaMP_6.*known: .*LaMP_1.*LaMP_7"):
        task_spec("LaMP_6")


def test_profile_conversions():
    ex = profile_to_example("LaMP_3", {"id": "r", "text": "Great pan", "score": 4}, "u", 0)
    assert ex.input.endswith("without further explanation. review: Great pan") and ex.output == "4"
    ex = profile_to_example("LaMP_2N", {"text": "Vote today", "category": "politics"}, "u", 1)
    assert ex.input.startswith("Which category does this article relate to")
    assert ex.input.endswith("article: Vote today")
    assert ex.id == "u/1"
    ex = profile_to_example("LaMP_4", {"text": "Body", "title": "Head"}, "u", 0)
    assert (ex.input, ex.output) == ("Generate a headline for the following article: Body", "Head")
    ex = profile_to_example("LaMP_5", {"abstract": "We study X.", "title": "On X"}, "u", 0)
    assert (ex.input, ex.output) == ("Generate a title for the following abstract of a paper: We study X.", "On X")
    ex = profile_to_example("LaMP_1", {"abstract": "We study X.", "title": "On X"}, "u", 0)
    assert ex.output == "On X" and ex.input.endswith("paper: We study X.")
    ex = profile_to_example("LaMP_7", {"text": "sooo tired #mondays 😴"}, "u", 0)
    assert ex.output == "sooo tired #mondays 😴"
    assert ex.input.endswith("before or after it: So tired mondays.")
    with pytest.raises(LampDataError, match="rating 'great' is not a number"):
        profile_to_example("LaMP_3", {"text": "t", "score": "great"}, "u", 0)


def test_plain_tweet():
    assert plain_tweet("omg!!! #win") == "Omg! win."
    assert plain_tweet("Fine?") == "Fine?"


@needs_sample
def test_eval_overlap_on_the_sample_and_its_exclusion():
    from shared.data.lamp import apply_template, eval_overlap, exclude_eval_overlap
    spec, users = load_lamp(SAMPLE, holdout=2)
    users = apply_template(users, spec.name, "compact")
    # docs/results/lamp2.md: most questions describe a movie another user's history already tags
    assert eval_overlap(users) == {"test": 59, "val": 37}
    kept, dropped = exclude_eval_overlap(users)
    assert dropped == 219 and sum(len(u.train) for u in kept) == 576 - 219
    assert eval_overlap(kept) == {"test": 0, "val": 0}
    held = {e.input for u in kept for e in u.test + u.val}
    assert not any(e.input in held for u in kept for e in u.train)
    assert [len(u.test) for u in kept] == [len(u.test) for u in users]  # evaluation untouched
