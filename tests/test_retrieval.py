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
CHAT_ITEM = "<|user|>\n" + ITEM    # the same, first in the user's turn of the chat template
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
    # the rag rows through the chat template (retrieval.chat's default), the items first in the user's turn
    bare = [c for c in prompts_seen if not any(ITEM in p for p in c)]
    rag = [c for c in prompts_seen if all(p.startswith(CHAT_ITEM) and p.endswith("<|assistant|>\n") for p in c)]
    assert bare and rag and len(bare) + len(rag) == len(prompts_seen)
    assert all(p.endswith(ANSWER) for c in bare for p in c)


def test_method_rag_through_proper_local(tmp_path, prompts_seen):
    from sim.local import run_local
    run_local(load_config("tiny", ["method=rag", *ROOMY]), tmp_path / "local")
    check_rag(tmp_path / "local", prompts_seen)


def test_method_rag_through_proper_sim_the_clients_retrieve(tmp_path, prompts_seen):
    from sim.run import run_sim
    assert run_sim("tiny", [f"output.dir={tmp_path}", "output.name=fed", "simulation.engine=inprocess",
                            "method=rag", *ROOMY]) == 0
    check_rag(tmp_path / "fed", prompts_seen)


def test_rag_in_the_training_format_with_retrieval_chat_false(tmp_path, prompts_seen):
    from sim.local import run_local
    run_local(load_config("tiny", ["method=rag", "retrieval.chat=false", *ROOMY]), tmp_path / "plain")
    rag = [p for c in prompts_seen for p in c if ITEM in p]
    assert rag and all(p.startswith(ITEM) and p.endswith(ANSWER) for p in rag)
    assert not any("<|user|>" in p for c in prompts_seen for p in c)
    with pytest.raises(ConfigError, match="retrieval.chat"):
        load_config("tiny", ["retrieval.chat=true"])    # only rag asks through the template
    from shared.method.plan import rag_chat
    plain = load_backbone("tiny")[1]
    plain.chat_template = None                          # a model without a chat template: null falls back
    rag = load_config("tiny", ["method=rag"])
    assert rag_chat(rag, plain) is False and rag_chat(rag, load_backbone("tiny")[1]) is True
    assert rag_chat(load_config("tiny", ["method=rag", "retrieval.chat=false"]), load_backbone("tiny")[1]) is False


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


# ---------------------------------------------------------------- serving and auditing a run that retrieved
@pytest.fixture(scope="module")
def k1_run(tmp_path_factory):
    """A tiny `proper local` run trained and evaluated with retrieval.k=1 (and one canary, for the
    audit), and every prompt its evaluation generated from: (stage, prompt ids)."""
    import shared.evaluation.evaluate as ev
    from sim.local import run_local
    tmp = tmp_path_factory.mktemp("k1")
    data = write_synthetic_lamp(tmp / "data", n_users=4, n_groups=2, seed=5, min_profile=5, max_profile=8)
    calls, real = [], ev.generate_tokens

    def spy(model, tokenizer, prompts, *args, **kw):
        calls.extend((model.stage, tuple(p)) for p in prompts)
        return real(model, tokenizer, prompts, *args, **kw)
    ev.generate_tokens = spy
    try:
        run_local(load_config("tiny", [f"data.path={data}", "retrieval.k=1", "data.holdout=2", "eval.splits=[val,test]",
                                       "eval.stages=[user]", "privacy.canaries.users=1",
                                       "privacy.canaries.repeats=2", "privacy.canaries.candidates=7", *ROOMY]),
                  tmp / "run")
    finally:
        ev.generate_tokens = real
    return tmp / "run", data, calls


@pytest.fixture
def served_prompts(monkeypatch):
    """The prompt ids every `proper generate` / Serving generation starts from."""
    import client.serving as CS
    seen, real = [], CS.generate_tokens

    def spy(model, tokenizer, prompts, *args, **kw):
        seen.extend(tuple(p) for p in prompts)
        return real(model, tokenizer, prompts, *args, **kw)
    monkeypatch.setattr(CS, "generate_tokens", spy)
    return seen


def test_generate_on_a_run_trained_with_retrieval_asks_as_its_evaluation_did(k1_run, proper, served_prompts, tok):
    """`proper generate` gives a user's val and test questions the items their evaluation gave them:
    the same prompt ids, which differ from the bare question's."""
    from client.data import load_users
    from shared.data.canaries import run_canaries, with_canaries
    from shared.data.retrieval import Profile
    from shared.runtime.config import read_config
    run, data, calls = k1_run
    cfg = read_config(run / "config.yaml")
    spec, users = load_users(cfg)
    raw = with_canaries(users, run_canaries(cfg, users))     # the histories as the client held them
    users = with_retrieval(raw, spec, 1)
    evaluated = {p for stage, p in calls if stage == "user"}
    for u in users[:2]:
        for ex in (u.val[0], u.test[0]):
            want = tuple(encode_prompt(tok, ex.input, cfg.train.max_len, ex.context))
            assert want in evaluated                     # what client/predict.py generated from
            assert want != tuple(encode_prompt(tok, ex.input, cfg.train.max_len))
            assert tok.decode(list(want)).startswith(ITEM)
            served_prompts.clear()
            out = proper("generate", run, "--user", u.user_id, "--prompt", ex.input)
            assert out.code == 0, out.err
            assert served_prompts == [want]
    # several users in one batch, and the history named by --data: each user's own items
    text = users[0].val[0].input
    served_prompts.clear()
    out = proper("generate", run, "--user", "u0000", "--user", "u0001", "--prompt", text, "--data", data)
    assert out.code == 0, out.err
    assert served_prompts == [tuple(encode_prompt(tok, text, cfg.train.max_len, Profile(u, spec, 1).context(text)))
                              for u in raw[:2]]
    assert served_prompts[0] == tuple(encode_prompt(tok, text, cfg.train.max_len, users[0].val[0].context))


def test_generate_refuses_a_user_whose_history_it_cannot_find(k1_run, proper, tmp_path):
    run, _, _ = k1_run
    other = write_synthetic_lamp(tmp_path / "one", n_users=1, n_groups=1, seed=1, min_profile=4, max_profile=5)
    out = proper("generate", run, "--user", "u0002", "--prompt", "description: x", "--data", other)
    assert out.code == 2 and len(out.err) == 1
    assert "'u0002'" in out.err[0] and "retrieval.k=1" in out.err[0] and "--data" in out.err[0]
    assert str(other) in out.err[0]
    out = proper("generate", run, "--user", "u0002", "--prompt", "description: x", "--data", tmp_path / "nothing")
    assert out.code == 2 and "'u0002'" in out.err[0] and "pass --data" in out.err[0]


def test_a_user_with_an_empty_profile_gets_the_prompt_as_it_is(k1_run, tok):
    from client.serving import Serving
    from shared.data.lamp import User
    from shared.data.retrieval import Profile
    run = k1_run[0]
    serving = Serving(run)
    spec = serving.history("u0000")[0]
    assert Profile(User("new", [], [], []), spec, 1).context("description: a heist") is None
    serving._profiles["new"] = Profile(User("new", [], [], []), spec, 1)
    assert serving.contexts("new", ["description: a heist"]) == [None]
    assert serving.prompt_ids(["description: a heist"], [None]) == [
        encode_prompt(tok, "description: a heist", serving.cfg.train.max_len)]


def test_audit_scores_the_items_with_their_retrieved_items(k1_run, monkeypatch):
    """With retrieval.k > 0 the audit's members carry the items they were trained with, its held-out
    items those of their evaluation, and the canary's candidates items of the history without the
    canary's copies (whose label is the secret)."""
    import sim.audit as A
    from client.trainer import ClientTrainer
    from shared.data.canaries import is_canary
    from shared.runtime.config import read_config
    run = k1_run[0]
    cfg = read_config(run / "config.yaml")
    scored, real = [], A.example_losses

    def spy(model, tokenizer, examples, *args, **kw):
        scored.extend(examples)
        return real(model, tokenizer, examples, *args, **kw)
    monkeypatch.setattr(A, "example_losses", spy)
    out = A.run_audit(run)
    assert out["views"]["user"]["members"] > 0 and len(out["canaries"]) == 1
    assert scored and all(ex.context is not None for ex in scored)
    # the very contexts the client trained and evaluated with
    spec, users = A.load_users(cfg)
    trained = ClientTrainer(cfg, spec, users, str(run / "client_state")).users
    want = {ex.id: ex.context for u in trained for ex in u.train + u.val if not is_canary(ex)}
    members = {ex.id: ex.context for ex in scored if ex.id in want}
    assert members and members == {i: want[i] for i in members}
    canary = out["canaries"][0]
    asked = [ex for ex in scored if ex.id.startswith(canary["user"] + "/ca")]
    assert asked and all(not any(is_canary_id(s) for s in ex.context.sources) for ex in asked)
    assert all(canary["secret"] not in ex.context.render(ex.input) for ex in asked)


def is_canary_id(item_id: str) -> bool:
    return "/canary" in item_id


def test_audit_without_retrieval_scores_the_bare_items(users):
    import sim.audit as A
    from shared.data.canaries import make_canaries
    spec, plain = users
    cfg = load_config("tiny", [])
    canaries = make_canaries([u.user_id for u in plain], 1, repeats=2, digits=2, seed=0)
    items, held = A.audited_items(cfg, spec, plain, canaries, {canaries[0].user: [1, 2]})
    assert all(ex.context is None for exs in items.values() for ex in exs)
    assert all(ex.context is None for tr, va in held.values() for ex in tr + va)
    assert held == {u.user_id: (u.train, u.val) for u in plain if u.train and u.val}


def test_an_enrolled_user_is_served_with_items_of_the_files_it_was_enrolled_from(k1_run, proper, served_prompts,
                                                                                  tok, tmp_path):
    from client.serving import read_users
    from shared.data.retrieval import Profile
    from shared.runtime.config import read_config
    from shared.runtime.persist import UserStore, load_tensors
    run = k1_run[0]
    cfg = read_config(run / "config.yaml")
    files = write_synthetic_lamp(tmp_path / "new", n_users=5, n_groups=2, seed=8, min_profile=5, max_profile=8)
    out = proper("enroll", run, "--data", files, "--user", "u0004")
    assert out.code == 0, out.err
    meta = load_tensors(UserStore(run / "client_state").path("u0004", "embedding"))[1]
    assert meta["data"] == str(files.resolve())
    (user,) = read_users(cfg, files, ["u0004"])
    text = user.test[0].input
    served_prompts.clear()
    out = proper("generate", run, "--user", "u0004", "--prompt", text)   # no --data: the enrollment's files
    assert out.code == 0, out.err
    spec = load_lamp_spec(files, cfg)
    want = tuple(encode_prompt(tok, text, cfg.train.max_len, Profile(user, spec, 1).context(text)))
    assert served_prompts == [want] and want == tuple(encode_prompt(tok, text, cfg.train.max_len, user.test[0].context))
    assert tok.decode(list(want)).startswith(ITEM)


def load_lamp_spec(path, cfg):
    from shared.data.lamp import load_lamp
    return load_lamp(path, task=cfg.data.task, holdout=cfg.data.holdout)[0]


def test_a_deployed_client_serves_its_users_with_items_of_its_own_files(tmp_path, proper, served_prompts, tok):
    """A deployed client keeps where its users' files are beside the run's shared parts (its config's
    data.path is the server's): generate finds the histories there, or refuses where they are gone."""
    from client.data import load_users
    from client.trainer import DATA_PATH, ClientTrainer
    from shared.data.retrieval import Profile
    server = write_synthetic_lamp(tmp_path / "server", n_users=1, n_groups=1, seed=2, min_profile=4, max_profile=5)
    mine = write_synthetic_lamp(tmp_path / "mine", n_users=3, n_groups=2, seed=4, min_profile=5, max_profile=8)
    cfg = load_config("tiny", [f"data.path={server}", "retrieval.k=1", "data.holdout=1", *ROOMY])
    spec, users = load_users(cfg, str(mine))
    state = tmp_path / "state"
    t = ClientTrainer(cfg, spec, users, str(state), keep_shared=True, data_path=str(mine))
    pop = t.population(None, 1).shared
    t.user(pop, t.group(pop, None, None, 1).shared)
    assert (state / DATA_PATH).read_text() == f"{mine.resolve()}\n"
    ex = t.users[2].val[0]
    out = proper("generate", state, "--user", "u0002", "--prompt", ex.input)
    assert out.code == 0, out.err
    want = tuple(encode_prompt(tok, ex.input, cfg.train.max_len, ex.context))
    assert served_prompts == [want] and tok.decode(list(want)).startswith(ITEM)
    assert Profile(users[2], spec, 1).context(ex.input) == ex.context
    (state / DATA_PATH).unlink()   # the server's data.path is all that is left, and it lacks u0002
    out = proper("generate", state, "--user", "u0002", "--prompt", ex.input)
    assert out.code == 2 and "'u0002'" in out.err[0] and str(server) in out.err[0] and "--data" in out.err[0]
    served_prompts.clear()
    out = proper("generate", state, "--user", "u0002", "--prompt", ex.input, "--data", mine)
    assert out.code == 0 and served_prompts == [want]


def test_a_deployed_clients_trainer_knows_its_own_files(tmp_path, monkeypatch):
    """client/runtime.py gives a real client's trainer its node's data-path (what it writes beside the
    shared parts); a simulated one's none."""
    from types import SimpleNamespace

    from client.runtime import trainer_for
    from shared.runtime.process import PROCESS
    mine = write_synthetic_lamp(tmp_path / "mine", n_users=2, n_groups=1, seed=4, min_profile=4, max_profile=5)
    monkeypatch.delenv("PROPER_RUN_DIR", raising=False)
    monkeypatch.setattr(PROCESS, "trainer", None)
    ctx = SimpleNamespace(run_config={"config": "tiny", "run-dir": str(tmp_path / "run")}, run_id=1,
                          node_config={"data-path": str(mine), "state-dir": str(tmp_path / "state")})
    t = trainer_for(ctx, "population")
    assert t.data_path == str(mine) and t.keep_shared and str(t.store.root) == str(tmp_path / "state" / "run")


def test_audit_asks_a_single_copy_canary_with_the_items_it_was_trained_with(users):
    import sim.audit as A
    from shared.data.canaries import make_canaries, with_canaries
    spec, plain = users
    cfg = load_config("tiny", ["retrieval.k=2"])
    for repeats in (1, 3):
        canaries = make_canaries([u.user_id for u in plain], 1, repeats=repeats, digits=2, seed=0)
        c = canaries[0]
        items, held = A.audited_items(cfg, spec, plain, canaries, {c.user: [1, 2]})
        trained = next(u for u in with_retrieval(with_canaries(plain, canaries), spec, 2) if u.user_id == c.user)
        copies = [ex for ex in trained.train if "/canary" in ex.id]
        assert len(copies) == repeats and all(ex.context == items[c.user][0].context for ex in items[c.user])
        assert not any("/canary" in s for s in items[c.user][0].context.sources)
        assert (copies[0].context == items[c.user][0].context) == (repeats == 1)
        assert held[c.user][0] == [ex for ex in trained.train if "/canary" not in ex.id]
