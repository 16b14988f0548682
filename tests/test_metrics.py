"""LaMP metrics: the one path runs use (per example -> sufficient statistics summed over users and
clients -> metrics), checked against LaMP's definitions written out here independently, against
the rouge-score package itself, and against the values the code gave before it became one path."""
import math
import random

import numpy as np
import pytest

from shared.data.lamp import task_spec
from shared.evaluation.metrics import (
    accuracy,
    add_stats,
    bootstrap_ci,
    example_stats,
    match_label,
    per_example_scores,
    stats_metrics,
    task_metrics,
)

LABEL, RATING, GENERATION = task_spec("LaMP_2"), task_spec("LaMP_3"), task_spec("LaMP_4")


def summed(spec, users):
    """The metrics of several users' predictions the way a run gets them: statistics added up."""
    stats = None
    for preds, golds in users:
        stats = add_stats(stats, example_stats(spec, preds, golds))
    return stats_metrics(spec, stats)


# ---------------------------------------------------------------- LaMP's definitions, written out
def lamp_macro_f1(preds, golds, labels):
    """sklearn's f1_score(golds, preds, labels=labels, average="macro", zero_division=0), as LaMP
    calls it: per label precision and recall (0 where undefined), F1 = 2PR / (P + R)."""
    p = [x.strip().lower() for x in preds]
    g = [x.strip().lower() for x in golds]
    f1s = []
    for lab in (x.lower() for x in labels):
        tp = sum(a == lab == b for a, b in zip(p, g))
        predicted, actual = p.count(lab), g.count(lab)
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def lamp_rating(pred, gold):
    """LaMP's create_mapping: a prediction that is not a number becomes the farther end of 1..5."""
    try:
        return float(pred)
    except ValueError:
        return 1.0 if abs(1 - float(gold)) > abs(5 - float(gold)) else 5.0


def random_label_users(rng, n_users):
    pool = LABEL.labels + ["not a tag", " Comedy", "SCI-FI "]
    return [([rng.choice(pool) for _ in range(k)], [rng.choice(LABEL.labels) for _ in range(k)])
            for k in (rng.randint(1, 8) for _ in range(n_users))]


@pytest.mark.parametrize("seed", range(20))
def test_label_metrics_summed_over_users_are_lamps_over_all_predictions(seed):
    users = random_label_users(random.Random(seed), 1 + seed % 5)
    preds = [p for ps, _ in users for p in ps]
    golds = [g for _, gs in users for g in gs]
    m = summed(LABEL, users)
    assert m["accuracy"] == pytest.approx(sum(a.strip().lower() == b for a, b in zip(preds, golds)) / len(golds))
    assert m["macro_f1"] == pytest.approx(lamp_macro_f1(preds, golds, LABEL.labels))
    assert m == task_metrics(LABEL, preds, golds)    # the same statistics, however they are split


def test_macro_f1_hand_computed_over_the_full_label_set():
    spec = LABEL.__class__("t", "label", ["a", "b", "c"], ["accuracy", "macro_f1"])
    # a: tp=1 fp=1 fn=0 -> 2/3 ; b: tp=1 fp=0 fn=1 -> 2/3 ; c: no gold, no pred -> 0
    assert task_metrics(spec, ["a", "a", "b"], ["a", "b", "b"])["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    # a prediction outside the label set is wrong for every label: a: tp=0 fn=1 -> 0 ; b: 2/(2+0+0)=1
    assert task_metrics(spec, ["zzz", "B"], ["a", "b"]) == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3})
    m = task_metrics(LABEL, ["comedy", "action"], ["comedy", "fantasy"])
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx(1 / 15)   # 15 tags, one with F1 = 1


def test_rating_metrics_are_lamps_with_its_rule_for_unparsable_answers():
    rng = random.Random(0)
    answers = ["1", "2", "3", "4", "5", " 3 ", "2.5", "junk", "", "five"]
    for trial in range(20):
        users = [([rng.choice(answers) for _ in range(k)], [str(rng.randint(1, 5)) for _ in range(k)])
                 for k in (rng.randint(1, 6) for _ in range(1 + trial % 4))]
        errs = [lamp_rating(p, g) - float(g) for ps, gs in users for p, g in zip(ps, gs)]
        m = summed(RATING, users)
        assert m["mae"] == pytest.approx(sum(abs(e) for e in errs) / len(errs))
        assert m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / len(errs)))


def test_rating_hand_computed_and_non_finite_answers_count_as_unparsable():
    # gold 2 -> junk scored as 5 (err 3); gold 4 -> junk scored as 1 (err 3); "3" vs 5 -> err 2
    m = task_metrics(RATING, ["junk", "", " 3 "], ["2", "4", "5"])
    assert m == pytest.approx({"mae": (3 + 3 + 2) / 3, "rmse": math.sqrt((9 + 9 + 4) / 3)})
    # "nan" and "inf" parse as floats but would poison the sums: LaMP's rule, not a NaN
    # (tie at gold 3: LaMP picks 5, |1-3| > |5-3| being false; error 2 either way)
    assert task_metrics(RATING, ["nan", "inf"], ["3", "4"]) == pytest.approx({"mae": 2.5, "rmse": math.sqrt(6.5)})
    with pytest.raises(ValueError, match="gold rating"):
        example_stats(RATING, ["3"], ["three"])


def test_rouge_is_the_rouge_score_packages_without_stemming():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rng = random.Random(1)
    words = "the a cat cats dog sat on mat Runs fast, news: study finds coffee heart".split()
    for trial in range(10):
        users = [([" ".join(rng.choices(words, k=rng.randint(0, 9))) for _ in range(k)],
                  [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(k)])
                 for k in (rng.randint(1, 5) for _ in range(1 + trial % 3))]
        scores = [scorer.score(g, p) for ps, gs in users for p, g in zip(ps, gs)]   # score(target, prediction)
        m = summed(GENERATION, users)
        assert m["rouge-1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in scores) / len(scores))
        assert m["rouge-L"] == pytest.approx(sum(s["rougeL"].fmeasure for s in scores) / len(scores))


def test_rouge_hand_computed():
    # pred "the cat sat", gold "the cat sat down": unigram P=3/3, R=3/4 -> F=6/7; LCS=3 -> same
    assert task_metrics(GENERATION, ["the cat sat"], ["the cat sat down"]) == pytest.approx(
        {"rouge-1": 6 / 7, "rouge-L": 6 / 7})
    # "b a" vs "a b": unigram F=1, LCS=1 -> P=R=1/2 -> F=1/2; averaged with an exact match
    assert task_metrics(GENERATION, ["b a", "hello"], ["a b", "hello"]) == pytest.approx(
        {"rouge-1": 1.0, "rouge-L": 0.75})
    assert task_metrics(GENERATION, ["cats"], ["cat"])["rouge-1"] == 0.0   # LaMP: no stemming


def test_per_example_scores_and_accuracy():
    assert per_example_scores(LABEL, ["comedy", " Action"], ["comedy", "fantasy"]) == [1.0, 0.0]
    assert per_example_scores(RATING, ["4", "x"], ["5", "1"]) == [1.0, 4.0]
    assert per_example_scores(GENERATION, ["b a", "a b"], ["a b", "a b"]) == pytest.approx([0.5, 1.0])
    assert accuracy([" Comedy", "action", "x"], ["comedy", "Action ", "fantasy"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 golds"):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 golds"):
        example_stats(LABEL, ["comedy"], ["comedy", "action"])   # zip would have dropped one silently


def test_no_examples_give_no_metrics_and_statistics_of_other_shapes_do_not_add():
    assert stats_metrics(LABEL, example_stats(LABEL, [], [])) == {}
    with pytest.raises(ValueError, match="cannot add"):
        add_stats(example_stats(LABEL, ["comedy"], ["comedy"]), example_stats(RATING, ["3"], ["3"]))


# ---------------------------------------------------------------- the values before the one path
# What the code gave before the metrics had one implementation (run on it, then frozen): the
# per-set functions (accuracy, macro_f1, mae_rmse, rouge) and evaluate.py's statistics agreed on
# these, and the statistics path must keep giving them. Label and rating values are exact; ROUGE
# sums may differ in the last bit (the old statistics stored mean * n, the new ones the sum).
BEFORE = {
    "LaMP_2": ([(["comedy", " Action", "sci-fi", "zzz", "dark comedy", "classic", "comedy"],
                 ["comedy", "action", "fantasy", "sci-fi", "dark comedy", "classic", "romance"],
                 {"accuracy": 0.5714285714285714, "macro_f1": 0.24444444444444444},
                 [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
                (["true story", "violence", "Comedy"], ["true story", "comedy", "comedy"],
                 {"accuracy": 0.6666666666666666, "macro_f1": 0.1111111111111111}, [1.0, 0.0, 1.0])],
               {"accuracy": 0.6, "macro_f1": 0.31111111111111106}),
    "LaMP_3": ([(["4", "x", "nan", " 3 ", "inf", "2.5", ""], ["5", "1", "3", "3", "2", "4", "4"],
                 {"mae": 2.0714285714285716, "rmse": 2.4275207811380612}, [1.0, 4.0, 2.0, 0.0, 3.0, 1.5, 3.0]),
                (["1", "5"], ["1", "2"], {"mae": 1.5, "rmse": 2.1213203435596424}, [0.0, 3.0])],
               {"mae": 1.9444444444444444, "rmse": 2.362907813126304}),
    "LaMP_4": ([(["the cat sat on the mat", "b a", "hello world", "", "A new study finds coffee helps"],
                 ["the cat sat down", "a b", "hello", "nothing here", "Study: coffee may help the heart"],
                 {"rouge-1": 0.52, "rouge-L": 0.42000000000000004},
                 [0.6, 0.5, 0.6666666666666666, 0.0, 0.3333333333333333]),
                (["one two three four", "x y z"], ["one three two four five", "z y x w"],
                 {"rouge-1": 0.873015873015873, "rouge-L": 0.47619047619047616},
                 [0.6666666666666665, 0.28571428571428575])],
               {"rouge-1": 0.6208616780045352, "rouge-L": 0.43605442176870746}),
}


@pytest.mark.parametrize("task", sorted(BEFORE))
def test_metrics_are_the_values_the_code_gave_before(task):
    spec, (users, total) = task_spec(task), BEFORE[task]
    same = (lambda v: v) if spec.kind != "generation" else (lambda v: pytest.approx(v, rel=1e-12, abs=0))
    for preds, golds, metrics, per_example in users:
        assert task_metrics(spec, preds, golds) == same(metrics)
        assert per_example_scores(spec, preds, golds) == per_example
    assert summed(spec, [(p, g) for p, g, _, _ in users]) == same(total)


# ---------------------------------------------------------------- predictions and intervals
def test_match_label():
    tags = LABEL.labels
    assert match_label("  Comedy ", tags) == "comedy"
    assert match_label("dark comedy, because it is grim", tags) == "dark comedy"
    assert match_label('"sci-fi".', tags) == "sci-fi"
    assert match_label("classical music", tags) is None  # "classic" needs a word boundary
    assert match_label("I think it's comedy", tags) is None
    assert match_label("[2]: the second", ["[1]", "[2]"]) == "[2]"


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
    # the users' scores arrive shuffled (no ids, no order): the interval must not depend on their order
    assert all(bootstrap_ci(list(np.random.default_rng(k).permutation(vals)), seed=3) == (mean, lo, hi)
               for k in range(5))


def test_paired_comparison_averages_seeds_per_user_and_bootstraps_over_users(tmp_path):
    """bench/paired.py: per seed, each side's mean over the users present in every run; the
    difference is averaged over seeds user by user, its interval resamples users."""
    import pytest

    from bench.paired import compare, main

    def run(name, values):
        d = tmp_path / name
        d.mkdir()
        rows = [f"u{i},{v}" for i, v in enumerate(values)]
        rows = ["user,group@val"] + (rows[::-1] if name.endswith("1") else rows)   # matched by id, not by row
        (d / "per_user.csv").write_text("\n".join(rows) + "\n")
        return d

    a = [run("a0", [1, 1, 0.5, 1]), run("a1", [1, 0.5, 0.5, ""])]     # u3 missing in a1: dropped
    b = [run("b0", [0, 1, 0.5, 0]), run("b1", [0.5, 0.5, 0, 0])]
    r = compare(a, b, "group@val", n_boot=2000)
    assert r["users"] == 3
    assert r["a"] == pytest.approx([2.5 / 3, 2 / 3]) and r["b"] == pytest.approx([0.5, 1 / 3])
    # per-user seed-averaged differences: u0 (1 + .5) / 2, u1 0, u2 (0 + .5) / 2
    assert r["diff"] == pytest.approx((0.75 + 0 + 0.25) / 3)
    assert 0 <= r["lo"] <= r["diff"] <= r["hi"] <= 0.75
    # every user gains 1 in one seed and 0 in the other: nothing varies over users, all over seeds
    seeds_apart = compare([run("c0", [1, 1, 1]), run("c1", [0, 0, 0])],
                          [run("d0", [0, 0, 0]), run("d1", [0, 0, 0])], "group@val", n_boot=2000)
    assert seeds_apart["lo"] == seeds_apart["hi"] == 0.5
    assert seeds_apart["lo_seeds"] == 0.0 and seeds_apart["hi_seeds"] == 1.0
    same = compare(a, a, "group@val", n_boot=200)
    assert same["diff"] == same["lo"] == same["hi"] == 0
    with pytest.raises(SystemExit, match="no column"):
        compare(a, b, "user@val")
    with pytest.raises(SystemExit, match="same number"):
        compare(a, b[:1], "group@val")
    out = tmp_path / "t.md"
    main(["--a", f"{a[0]},{a[1]}", "--b", f"{b[0]},{b[1]}", "--labels", "UA,MoE", "--out", str(out)])
    assert "| UA - MoE |" in out.read_text() and "**+33.3**" in out.read_text()
