"""Retrieval over the user's own profile (shared/data/retrieval.py): BM25, what a query may retrieve,
the prompt it makes within its budget, method=rag through `proper local` and `proper sim`, and
retrieval.k in a trained method's inputs (docs/decisions.md, "Retrieval")."""
import json

import pytest

import shared.evaluation.evaluate as E
from shared.data.encode import ANSWER, encode_example, encode_prompt, encode_users
from shared.data.retrieval import BM25, Retrieved, with_retrieval, words
from shared.data.synthetic import write_synthetic_lamp
from shared.method.plan import retrieval_k, stage_plan
from shared.runtime.backbone import load_backbone
from shared.runtime.config import ConfigError, load_config

ITEM = 'the tag for the movie: "'   # how LaMP_2 writes a retrieved item
# the tiny model's tokenizer counts bytes: compact prompts and room for a few items
ROOMY = ["data.template=compact", "train.max_len=256"]


@pytest.fixture(scope="module")
def tok():
    return load_backbone("tiny")[1]


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    from client.data import load_users
    path = tmp_path_factory.mktemp("syn")
    write_synthetic_lamp(path, n_users=6, n_groups=2, seed=3, min_profile=5, max_profile=9)
    return load_users(load_config("tiny", [f"data.path={path}", "data.holdout=2", *ROOMY]))


def test_bm25_ranks_the_item_that_shares_the_rare_words_first():
    docs = ["a quiet drama about a family dinner", "robots and a spaceship crew on a distant planet",
            "a family comedy about a wedding", "the spaceship crew fights robots", "a heist in a casino"]
    index = BM25([words(d) for d in docs])
    assert index.top(words("robots take over the spaceship"), 2) == [3, 1]   # the shorter of the two first
    assert index.top(words("a casino heist"), 1) == [4]
    assert index.top(words("a casino heist"), 3, skip=4)[0] != 4
    assert index.top(words("zebra xylophone"), 2) == [0, 1]   # no match: the earlier items, as LaMP fills k


def test_a_query_retrieves_only_its_own_users_training_items_never_itself(users):
    spec, plain = users
    for u in with_retrieval(plain, spec, 3):
        history = [ex.id for ex in u.train]
        for ex in u.train + u.val + u.test:
            got = ex.context.sources
            assert got and set(got) <= set(history) and len(set(got)) == len(got) <= 3
            assert ex.id not in got                      # a training item never retrieves itself
            assert not set(got) & {v.id for v in u.val}  # held-out items are never retrieved
    everything = with_retrieval(plain, spec, 100)
    assert all(len(ex.context.sources) == len(u.train) - 1 for u in everything for ex in u.train)
    assert all(len(ex.context.sources) == len(u.train) for u in everything for ex in u.val + u.test)


def test_k0_leaves_the_users_and_their_encoded_inputs_unchanged(users, tok):
    spec, plain = users
    assert with_retrieval(plain, spec, 0) is plain
    assert retrieval_k(load_config("tiny", [])) == 0 and retrieval_k(load_config("tiny", ["method=rag"])) == 4
    assert all(ex.context is None for u in plain for ex in u.train + u.val + u.test)
    again = [encode_example(tok, ex, 0, 256).input_ids for ex in plain[0].train]
    assert again == [e.input_ids for e in encode_users(tok, plain[:1], 256)]


def test_retrieved_items_go_before_the_whole_question_and_change_the_inputs(users, tok):
    spec, plain = users
    augmented = with_retrieval(plain, spec, 2)
    before, after = encode_users(tok, plain, 256), encode_users(tok, augmented, 256)
    assert [e.labels[-3:] for e in before] == [e.labels[-3:] for e in after]   # the same answers learned
    changed = 0
    for a, b, ex in zip(before, after, [ex for u in augmented for ex in u.train]):
        text = tok.decode(b.input_ids)
        assert len(b.input_ids) <= 256
        if a.input_ids != b.input_ids:
            changed += 1
            assert text.startswith(ITEM) and (". " + ex.input + ANSWER) in text   # the question is whole
    assert changed == len(after)


def test_items_are_cut_first_lowest_ranked_out_first_and_keep_their_labels(tok):
    question = "description: a heist in a casino goes wrong"
    items = tuple((ITEM, "x " * 40 + f"movie {i}", f'" is "tag{i}"') for i in range(3))
    ctx = Retrieved(items, ("u/0", "u/1", "u/2"))
    roomy = tok.decode(encode_prompt(tok, question, 1000, ctx))
    assert roomy == ctx.render(question) + ANSWER                      # everything fits: nothing is cut
    tight = encode_prompt(tok, question, 160, ctx)
    text = tok.decode(tight)
    assert len(tight) <= 160 and text.endswith(question + ANSWER)
    assert 'is "tag0"' in text and "tag2" not in text                 # the lowest-ranked item went first
    assert "movie 0" not in text                                      # the kept item's text was cut, its label kept
    # no room for a single item: the question alone, exactly as without retrieval
    assert encode_prompt(tok, question, 60, ctx) == encode_prompt(tok, question, 60)


def test_method_rag_plans_one_evaluation_and_refuses_k0():
    assert [s.name for s in stage_plan(load_config("tiny", ["method=rag"]))] == ["eval:base", "eval:rag"]
    with pytest.raises(ConfigError, match="retrieval.k"):
        load_config("tiny", ["method=rag", "retrieval.k=0"])
    with pytest.raises(ConfigError, match="retrieval.k"):
        load_config("tiny", ["retrieval.k=-1"])


@pytest.fixture
def prompts_seen(monkeypatch):
    """Every prompt the evaluation generated from, decoded (evaluate.generate is what predict calls)."""
    seen = []
    real = E.generate

    def spy(model, tokenizer, prompts, *a, **kw):
        seen.append([tokenizer.decode(p) for p in prompts])
        return real(model, tokenizer, prompts, *a, **kw)
    monkeypatch.setattr(E, "generate", spy)
    return seen


def check_rag(run, prompts_seen):
    """The RAG row beside the bare one; nothing trained; the rag prompts carry items, the bare ones not."""
    assert "| RAG: bare backbone + the user's retrieved items |" in (run / "table.md").read_text()
    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records if r.get("kind") == "eval"} == {"base", "rag"}
    assert not [r for r in records if r.get("kind") == "train"]
    assert {r["stage"] for r in json.loads((run / "table.json").read_text())} == {"base", "rag"}
    bare = [c for c in prompts_seen if not any(p.startswith(ITEM) for p in c)]
    rag = [c for c in prompts_seen if all(p.startswith(ITEM) for p in c)]
    assert bare and rag and len(bare) + len(rag) == len(prompts_seen)


def test_method_rag_through_proper_local(tmp_path, prompts_seen):
    from sim.local import run_local
    run_local(load_config("tiny", ["method=rag", *ROOMY]), tmp_path / "local")
    check_rag(tmp_path / "local", prompts_seen)


def test_method_rag_through_proper_sim_the_clients_retrieve(tmp_path, prompts_seen):
    from sim.run import run_sim
    assert run_sim("tiny", [f"output.dir={tmp_path}", "output.name=fed", "simulation.engine=inprocess",
                            "method=rag", *ROOMY]) == 0
    check_rag(tmp_path / "fed", prompts_seen)


def test_retrieval_k_in_proper_trains_and_evaluates_with_the_items(tmp_path, prompts_seen, monkeypatch):
    import shared.method.stages as S
    from sim.local import run_local
    trained = []
    real = S.encode_users

    def spy(tokenizer, users, max_len, split="train"):
        items = real(tokenizer, users, max_len, split)
        trained.extend(tokenizer.decode(e.input_ids) for e in items)
        return items
    monkeypatch.setattr(S, "encode_users", spy)
    run_local(load_config("tiny", ["retrieval.k=2", "user.epochs=1", *ROOMY]), tmp_path / "k2")
    table = json.loads((tmp_path / "k2" / "table.json").read_text())
    assert {r["stage"] for r in table} == {"base", "population", "group", "user"}
    assert trained and all(t.startswith(ITEM) for t in trained)
    first, *later = prompts_seen                       # eval:base comes first and asks the question alone
    assert not any(p.startswith(ITEM) for p in first)
    assert later and all(p.startswith(ITEM) for c in later for p in c)
