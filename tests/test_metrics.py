import math

import pytest

from shared.data.lamp import task_spec
from shared.evaluation.metrics import (accuracy, bootstrap_ci, macro_f1, mae_rmse, match_label,
                            per_example_scores, rouge, task_metrics)


def test_accuracy_normalises():
    assert accuracy([" Comedy", "action", "x"], ["comedy", "Action ", "fantasy"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_macro_f1_hand_computed():
    labels = ["a", "b", "c"]
    # a: tp=1 fp=1 fn=0 -> 2/3 ; b: tp=1 fp=0 fn=1 -> 2/3 ; c: no gold, no pred -> 0
    assert macro_f1(["a", "a", "b"], ["a", "b", "b"], labels) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    # a prediction outside the label set is wrong for every label: a: tp=0 fn=1 -> 0 ; b: 2/(2+0+0)=1
    assert macro_f1(["zzz", "B"], ["a", "b"], labels) == pytest.approx(1 / 3)


def test_macro_f1_matches_sklearn_definition_on_mixed_case():
    # what sklearn's f1_score(golds, preds, labels=[a,b,c,d], average="macro", zero_division=0)
    # gives: a: tp2 fp1 fn0 -> 0.8 ; b: tp1 fp0 fn1 -> 2/3
    preds = ["a", "a", "a", "b", "c", "x"]
    golds = ["a", "a", "b", "b", "d", "c"]
    # c: tp0 fp1 fn1 -> 0 ; d: tp0 fp0 fn1 -> 0 ; so mean = (0.8 + 2/3) / 4
    assert macro_f1(preds, golds, ["a", "b", "c", "d"]) == pytest.approx((0.8 + 2 / 3) / 4)


def test_mae_rmse_unparsable_counts_as_far_end():
    # gold 2 -> junk scored as 5 (err 3); gold 4 -> junk scored as 1 (err 3); "3" vs 5 -> err 2
    mae, rmse = mae_rmse(["junk", "", " 3 "], ["2", "4", "5"])
    assert mae == pytest.approx((3 + 3 + 2) / 3)
    assert rmse == pytest.approx(math.sqrt((9 + 9 + 4) / 3))
    # tie at gold 3: LaMP picks 5 (|1-3| > |5-3| is false), error 2 either way
    assert mae_rmse(["nan"], ["3"]) == pytest.approx((2.0, 2.0))


def test_rouge_hand_computed():
    # pred "the cat sat", gold "the cat sat down": unigram P=3/3, R=3/4 -> F=6/7; LCS=3 -> same
    r = rouge(["the cat sat"], ["the cat sat down"])
    assert r["rouge-1"] == pytest.approx(6 / 7) and r["rouge-L"] == pytest.approx(6 / 7)
    # "b a" vs "a b": unigram F=1, LCS=1 -> P=R=1/2 -> F=1/2; averaged with an exact match
    r = rouge(["b a", "hello"], ["a b", "hello"])
    assert r["rouge-1"] == pytest.approx(1.0) and r["rouge-L"] == pytest.approx((0.5 + 1) / 2)
    # stemming: "cats" ~ "cat" only with the stemmer
    assert rouge(["cats"], ["cat"], use_stemmer=True)["rouge-1"] == pytest.approx(1.0)
    assert rouge(["cats"], ["cat"])["rouge-1"] == 0.0  # LaMP default: no stemming


def test_match_label():
    tags = task_spec("LaMP_2").labels
    assert match_label("  Comedy ", tags) == "comedy"
    assert match_label("dark comedy, because it is grim", tags) == "dark comedy"
    assert match_label('"sci-fi".', tags) == "sci-fi"
    assert match_label("classical music", tags) is None  # "classic" needs a word boundary
    assert match_label("I think it's comedy", tags) is None
    assert match_label("[2]: the second", ["[1]", "[2]"]) == "[2]"


def test_task_metrics_and_per_example():
    lab = task_spec("LaMP_2")
    m = task_metrics(lab, ["comedy", "action"], ["comedy", "fantasy"])
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx(1 / 15)
    assert per_example_scores(lab, ["comedy", "action"], ["comedy", "fantasy"]) == [1.0, 0.0]
    rat = task_spec("LaMP_3")
    assert task_metrics(rat, ["4", "x"], ["5", "1"]) == pytest.approx({"mae": 2.5, "rmse": math.sqrt(8.5)})
    assert per_example_scores(rat, ["4", "x"], ["5", "1"]) == [1.0, 4.0]
    gen = task_spec("LaMP_4")
    assert set(task_metrics(gen, ["a b"], ["a b"])) == {"rouge-1", "rouge-L"}
    assert per_example_scores(gen, ["b a", "a b"], ["a b", "a b"]) == pytest.approx([0.5, 1.0])


def test_bootstrap_ci():
    vals = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25]
    mean, lo, hi = bootstrap_ci(vals, seed=3)
    assert mean == pytest.approx(sum(vals) / len(vals))
    assert lo < mean < hi and 0.0 <= lo and hi <= 1.0
    assert bootstrap_ci(vals, seed=3) == (mean, lo, hi)
    assert bootstrap_ci(vals, seed=4) != (mean, lo, hi)
    # a narrower confidence level gives a narrower interval
    _, lo90, hi90 = bootstrap_ci(vals, alpha=0.5, seed=3)
    assert lo <= lo90 and hi90 <= hi and hi90 - lo90 < hi - lo
    assert bootstrap_ci([2.0, 2.0]) == (2.0, 2.0, 2.0)
