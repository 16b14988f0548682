"""group.assign_start=signature: the assignment starts from a clustering of the users' (kind of
input, answer) counts (shared/method/signatures.py)."""
from __future__ import annotations

import pytest
import torch

from shared.data.lamp import Example, User
from shared.evaluation.groups import adjusted_rand_index
from shared.method.signatures import answer_signatures, item_readings, signature_groups
from tests.helpers import make_model

# two kinds of input; group 0 answers them "sci-fi" / "classic", group 1 the other way round, so
# both groups give each answer equally often: only the (input, answer) pairs tell them apart
KINDS = ["description: a starship crew lost in a far galaxy.", "description: a lawyer, a jury and a long trial."]
MAPS = [("sci-fi", "classic"), ("classic", "sci-fi")]


def _users(sizes=(2, 3, 4, 3, 2, 4)) -> tuple[list[User], list[int]]:
    users, truth = [], []
    for i, n in enumerate(sizes):
        g = i % 2
        uid = f"u{i}"
        items = [Example(f"{uid}/{j}", uid, KINDS[j % 2], MAPS[g][j % 2]) for j in range(n)]
        users.append(User(uid, items, [], []))
        truth.append(g)
    return users, truth


def test_item_readings_come_back_in_the_users_item_order():
    """make_batches sorts items by length; item_readings puts each reading back on its item."""
    model, tok = make_model(k=2)
    model.merge_population()
    users = [User("a", [Example("a/0", "a", "description: a much longer input than the other one here.", "x"),
                        Example("a/1", "a", "description: short.", "y")], [], []),
             User("b", [Example("b/0", "b", "description: mid length input.", "x")], [], [])]
    inp, ans, who = item_readings(model, tok, users, 64)
    assert who.tolist() == [0, 0, 1]
    for n, x in enumerate([users[0].train[0], users[0].train[1], users[1].train[0]]):
        alone, alone_ans, _ = item_readings(model, tok, [User("z", [x], [], [])], 64)
        assert torch.allclose(inp[n], alone[0], atol=1e-5) and torch.allclose(ans[n], alone_ans[0], atol=1e-5)


def test_signatures_separate_groups_that_answer_alike_overall():
    model, tok = make_model(k=2)
    model.merge_population()
    users, truth = _users()
    sig = answer_signatures(model, tok, users, 64, codes=2, seed=0, labels=True)
    assert sig.shape == (6, 2, 2)                       # 2 kinds of input x 2 answers
    assert sig.sum((1, 2)).tolist() == [2, 3, 4, 3, 2, 4]   # every item counted once
    # users 0 and 2 (group 0) read alike; users 0 and 5 give each answer equally often, yet differ
    assert torch.equal(2 * sig[0], sig[2]) and not torch.equal(2 * sig[0], sig[5])
    groups = signature_groups(model, tok, users, 64, k=2, codes=2, seed=0, labels=True)
    assert adjusted_rand_index(groups.tolist(), truth) == 1.0
    # canary copies (privacy.canaries) are no way of answering: left out of the counts
    planted = [User(u.user_id, u.train + [Example(f"{u.user_id}/canary{j}", u.user_id, "secret:", "1 2")
                                          for j in range(3)], [], []) if i == 0 else u for i, u in enumerate(users)]
    assert torch.equal(answer_signatures(model, tok, planted, 64, codes=2, seed=0, labels=True), sig)
    # free-text answers (labels=False) are quantised into codes like the inputs
    free = answer_signatures(model, tok, users, 64, codes=2, seed=0, labels=False)
    assert free.shape == (6, 2, 2) and free.sum((1, 2)).tolist() == [2, 3, 4, 3, 2, 4]
    # one kind of input only: (input, answer) is the answer alone, and the groups are not separable
    flat = answer_signatures(model, tok, users, 64, codes=1, seed=0, labels=True)
    assert torch.equal(flat[0] / 2, flat[5] / 4)     # users 0 and 5: groups 0 and 1, answers alike


def test_answer_maps_group_users_whose_few_items_share_no_cell():
    """Two groups, four kinds of input, every user two items on two different kinds: two users of
    one group mostly share no (kind, answer) cell, yet each item fits one group's map only."""
    import itertools

    from shared.method.signatures import answer_maps
    counts, truth = [], []
    for g in (0, 1):
        for a, b in itertools.combinations(range(4), 2):
            c = torch.zeros(4, 8)
            c[a, 4 * g + a] = c[b, 4 * g + b] = 1       # group g answers kind i with answer 4g + i
            counts.append(c)
            truth.append(g)
    with pytest.raises(ValueError, match="smoothing"):
        answer_maps(torch.stack(counts), 2, seed=0, smoothing=0.0)
    labels = answer_maps(torch.stack(counts), 2, seed=0)
    assert adjusted_rand_index(labels.tolist(), truth) == 1.0
    assert torch.equal(labels, answer_maps(torch.stack(counts), 2, seed=0))      # seeded


def test_the_client_starts_the_assignment_from_the_signatures_once(tmp_path, monkeypatch):
    """ClientTrainer.group round 1 with assign_start=signature: assign_experts gets the signature
    groups as its start; a client holding fewer users than experts refuses, naming the option."""
    import client.trainer as trainer
    from client.trainer import ClientTrainer
    from shared.data.lamp import task_spec
    from shared.runtime.config import load_config
    users, truth = _users()
    overrides = ["adapters.k=2", "group.constraint_form=assign", "group.assign_start=signature",
                 "group.signature_codes=2", "train.max_len=64", "group.rounds=2"]
    cfg = load_config("tiny", overrides)
    starts = []
    real = trainer.assign_experts

    returned = []

    def spy(model, tok, us, c, seed, start=None, fixed=False):
        starts.append(None if start is None else start.clone())
        returned.append(real(model, tok, us, c, seed, start, fixed))
        return returned[-1]
    monkeypatch.setattr(trainer, "assign_experts", spy)
    spec = task_spec("LaMP_2")
    client = ClientTrainer(cfg, spec, users, str(tmp_path / "state"))
    pop = client.initial("population")
    res = client.group(pop, None, None, 1)
    client.group(pop, res.shared, res.mixtures, 2)
    assert starts[0] is not None and adjusted_rand_index(starts[0].tolist(), truth) == 1.0
    assert starts[1] is None                              # the experts differ now: the loss decides
    # group.reassign=false keeps the start in every round, the experts' losses unread
    kept = ClientTrainer(load_config("tiny", [*overrides, "group.reassign=false"]), spec, users, str(tmp_path / "kept"))
    starts.clear()
    res = kept.group(pop, None, None, 1)
    kept.group(pop, res.shared, res.mixtures, 2)
    assert starts[1] is not None and torch.equal(starts[0], starts[1])
    assert torch.equal(returned[-1], starts[0]) and torch.equal(returned[-2], starts[0])   # kept, not re-read
    assert kept._signature_start is not None and torch.equal(kept._signature_start, starts[0])
    few = ClientTrainer(cfg, spec, users[:1], str(tmp_path / "few"))
    with pytest.raises(ValueError, match="assign_start=signature"):
        few.group(pop, None, None, 1)


def test_a_federation_of_several_clients_refuses_signature_starts(tmp_path):
    """Each client would number its groups its own way: `proper sim` refuses before starting."""
    from shared.data.synthetic import write_synthetic_lamp
    from shared.runtime.config import ConfigError
    from sim.run import run_sim
    data = write_synthetic_lamp(tmp_path / "syn", n_users=4, n_groups=2, min_profile=3, max_profile=4, seed=0)
    from shared.method.signatures import refuse_in_federation
    from shared.runtime.config import load_config
    refuse_in_federation(load_config("tiny", []))                  # the default: nothing to refuse
    with pytest.raises(ConfigError, match="assign_start=signature"):   # what every federated client checks
        refuse_in_federation(load_config("tiny", ["group.assign_start=signature"]))
    with pytest.raises(ConfigError, match="assign_start=signature"):
        run_sim("tiny", [f"data.path={data}", f"output.dir={tmp_path}", "simulation.engine=inprocess",
                         "group.constraint_form=assign", "group.assign_start=signature"])
