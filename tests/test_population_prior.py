"""bench/population_prior.py: the population stage set beside the label prior, read off suite records."""
import json

from bench import population_prior as pp


def _write(d, name, obj):
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(obj))


def _ref(prior, own):
    return [{"label": "most frequent training label overall ('x')", "split": "val", "metrics": {"accuracy": prior}},
            {"label": "each user's most frequent training label", "split": "val", "metrics": {"accuracy": own}},
            {"label": "most frequent training label overall ('x')", "split": "test", "metrics": {"accuracy": 0.9}}]


def _cell(ds, seed, pop, base=0.1, rc=0):
    return {"dataset": ds, "method": "proper-fed", "seed": seed, "rc": rc,
            "stages": {"base": {"val": {"accuracy": base}},
                       "population": {"val": {"accuracy": pop, "macro_f1": pop / 4}}}}


def test_the_table_reads_seeds_references_and_the_correlation(tmp_path):
    res = tmp_path / "suite" / "results"
    for i, (prior, pops) in enumerate([(0.1, [0.1, 0.2]), (0.3, [0.3]), (0.5, [0.6, 0.4])]):
        _write(res, f"d{i}--reference.json", _ref(prior, 0.2))
        for s, p in enumerate(pops):
            _write(res, f"d{i}--proper-fed--s{s}.json", _cell(f"d{i}", s, p))
    _write(res, "d9--proper-fed--s0.json", _cell("d9", 0, 0.9, rc=1))    # a failed run is not read
    md = pp.table([("lr2", tmp_path / "suite")], "proper-fed")
    assert "| d0 | 10.0 | 20.0 | 10.0 | 15.0 [10.0, 20.0] | 3.8 [2.5, 5.0] |" in md
    assert "| d2 | 50.0 | 20.0 | 10.0 | 50.0 [40.0, 60.0] |" in md
    assert "d9" not in md
    # population means 0.15, 0.3, 0.5 against priors 0.1, 0.3, 0.5: close to +1
    r = pp.pearson([0.1, 0.3, 0.5], [0.15, 0.3, 0.5])
    assert 0.99 < r <= 1.0
    assert f"lr2: 3 data sets; correlation of the population stage's val with the prior's {r:+.2f}" in md


def test_a_directory_without_suite_results_is_refused(tmp_path, capsys):
    assert pp.main([str(tmp_path)]) == 2
    assert "holds no bench.suite results" in capsys.readouterr().err
