"""Batched multi-user inference: one batch holds rows of different users, each row computed with its
own user LoRA, LoRA-aware router and e_u (ProperModel.user_parts), and stage-3 evaluation uses it."""
import pytest
import torch

from shared.evaluation.evaluate import generate_tokens, label_logprobs
from tests.helpers import make_model, randomize

N_USERS = 3


@pytest.fixture(scope="module")
def users_model():
    """The tiny model at stage 3 with a random group part, and three users' random user parts."""
    model, tok = make_model()
    model.merge_population()
    randomize(model, "group", seed=2)
    parts = []
    for seed in range(3, 3 + N_USERS):
        randomize(model, "user", seed=seed)
        parts.append(model.part_state("user"))
    model.set_stage("user")
    emb = torch.randn(N_USERS, model.d_user, generator=torch.Generator().manual_seed(9))
    return model, tok, parts, emb


def alone(model, parts, user: int, fn):
    """fn() computed with only `user`'s part loaded: what that user's model gives by itself."""
    model.load_part_state("user", parts[user])
    return fn()


def test_a_mixed_batch_gives_each_row_its_users_logits(users_model):
    model, _, parts, emb = users_model
    ids = torch.randint(5, 200, (5, 9), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([2, 0, 1, 0, 2])  # any order, a user on several rows
    with torch.no_grad():
        want = torch.cat([alone(model, parts, u, lambda i=i, u=u: model(ids[i:i + 1], user_emb=emb[u:u + 1]).logits)
                          for i, u in enumerate(rows.tolist())])
        with model.user_parts(parts), model.users(emb[rows], rows=rows):
            got = model.lm(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        with model.user_parts(parts), model.users(emb[rows], rows=rows.roll(1)):  # rows given the wrong parts
            wrong = model.lm(input_ids=ids).logits
    assert not torch.allclose(wrong, want, atol=1e-3)


def test_rows_without_parts_are_refused(users_model):
    model, _, _, emb = users_model
    with pytest.raises(RuntimeError, match="user_parts"):
        with model.users(emb, rows=torch.tensor([0, 1, 2])):
            pass


def test_mixed_generation_and_label_scoring_equal_each_users_own(users_model):
    """Prompts of different lengths (left padding) and users, in one batch: the same greedy tokens
    and label log-probabilities as each user's model on its prompt alone."""
    model, tok, parts, emb = users_model
    prompts = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42, 43, 44]]
    rows = torch.tensor([1, 2, 0, 1])
    labels = ["comedy", "action", "sci-fi"]
    with model.user_parts(parts):
        tokens = generate_tokens(model, tok, prompts, emb[rows], 6, batch_size=4, bf16=False, user_rows=rows)
        scores = label_logprobs(model, tok, prompts, labels, emb[rows], bf16=False, batch_size=4, user_rows=rows)
    for i, u in enumerate(rows.tolist()):
        own = alone(model, parts, u, lambda i=i, u=u: generate_tokens(model, tok, [prompts[i]], emb[u:u + 1], 6,
                                                                       bf16=False))
        assert tokens[i] == own[0], i
        own_scores = alone(model, parts, u, lambda i=i, u=u: label_logprobs(model, tok, [prompts[i]], labels,
                                                                            emb[u:u + 1], bf16=False))
        assert torch.allclose(scores[i], own_scores[0], atol=1e-4), i


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_stage3_evaluation_batches_users_and_predicts_what_each_users_model_does(tmp_path, monkeypatch, mode):
    """The stage-3 evaluation now puts several users in a batch; each user's predictions are those of
    its own model run alone (its user LoRA loaded, one user at a time: the evaluation before)."""
    import client.predict
    from client.trainer import ClientTrainer, load_users
    from shared.data.synthetic import write_synthetic_lamp
    from shared.evaluation.evaluate import predict
    from shared.runtime.config import load_config
    data = write_synthetic_lamp(tmp_path / "data", n_users=4, n_groups=2, min_profile=4, max_profile=6, seed=1)
    cfg = load_config("tiny", [f"data.path={data}", f"eval.mode={mode}", "data.holdout=2", "eval.max_new_tokens=5"])
    spec, users = load_users(cfg)
    t = ClientTrainer(cfg, spec, users, str(tmp_path / "state"))
    pop = t.population(None, 1).shared
    group = t.group(pop, None, None, 1).shared
    t.user(pop, group)
    batched = []
    real = client.predict.predict

    def spy(model, tokenizer, spec, examples, cfg, **kw):
        out = real(model, tokenizer, spec, examples, cfg, **kw)
        batched.append((kw.get("user_rows"), [e.id for e in examples], out))
        return out
    monkeypatch.setattr(client.predict, "predict", spy)
    t.evaluate("user", pop, group, split="val")
    assert len(batched) == 1 and batched[0][0] is not None          # one pass, every user in it
    got = dict(zip(batched[0][1], batched[0][2]))
    assert len(set(batched[0][0].tolist())) == len(users)
    for u in users:
        t.load_user_adapter(u.user_id)
        emb = t.user_embedding(u).view(1, -1).expand(len(u.val), -1)
        own = predict(t.model, t.tokenizer, spec, u.val, cfg, user_emb=emb)
        assert [got[e.id] for e in u.val] == own, u.user_id


def test_a_users_parts_read_from_the_store_are_what_loading_them_gives(tmp_path):
    """read_user_adapter (what the stage-3 evaluation stacks) reads a user's LoRA and LoRA-aware router
    without loading them: the same tensors load_user_adapter puts in, and a file of another shape is refused."""
    from client.trainer import load_user_adapter, read_user_adapter, save_user_adapter
    from shared.runtime.persist import UserStore
    model, _ = make_model()
    store = UserStore(tmp_path)
    randomize(model, "user", seed=11)
    saved = model.part_state("user")
    save_user_adapter(model, store, "u1", "tiny")
    randomize(model, "user", seed=12)                  # something else in the model meanwhile
    before = model.part_state("user")
    read = read_user_adapter(model, store, "u1")
    assert all(torch.equal(model.part_state("user")[k], before[k]) for k in before)   # the model untouched
    load_user_adapter(model, store, "u1")
    loaded = model.part_state("user")
    assert read.keys() == loaded.keys() == saved.keys()
    assert all(torch.equal(read[k], loaded[k]) and torch.equal(read[k], saved[k]) for k in saved)
    router = store.load("u1", "router")
    store.save("u1", "router", {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in router.items()})
    with pytest.raises(ValueError, match="shape"):
        read_user_adapter(model, store, "u1")
