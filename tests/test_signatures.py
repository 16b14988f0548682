"""group.assign_start=signature: the assignment starts from a clustering of the users' (kind of
input, answer) counts (shared/method/signature_start.py and the modules it names)."""
from __future__ import annotations

import pytest
import torch

from shared.data.lamp import Example, User
from shared.evaluation.groups import adjusted_rand_index
from shared.method.answer_signatures import answer_signatures, item_readings, signature_groups
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
    groups = signature_groups(model, tok, users, 64, k=2, codes=2, seed=0, labels=True, prior=0.5)
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

    from shared.method.answer_signatures import answer_maps, smoothing_of
    counts, truth = [], []
    for g in (0, 1):
        for a, b in itertools.combinations(range(4), 2):
            c = torch.zeros(4, 8)
            c[a, 4 * g + a] = c[b, 4 * g + b] = 1       # group g answers kind i with answer 4g + i
            counts.append(c)
            truth.append(g)
    with pytest.raises(ValueError, match="prior"):
        answer_maps(torch.stack(counts), 2, seed=0, prior=0.0)
    labels = answer_maps(torch.stack(counts), 2, seed=0, prior=0.5)
    assert adjusted_rand_index(labels.tolist(), truth) == 1.0
    assert torch.equal(labels, answer_maps(torch.stack(counts), 2, seed=0, prior=0.5))      # seeded
    # the prior is a fraction of the items per cell: the same users with ten times the items group
    # alike, and 0.5 pseudo-counts per cell fixed (1.33 times the 0.375 items per cell here) would
    # make both maps alike and put everyone in one group
    assert adjusted_rand_index(answer_maps(10 * torch.stack(counts), 2, seed=0, prior=0.5).tolist(), truth) == 1.0
    assert smoothing_of(0.5, 24, 2 * 4 * 8) == pytest.approx(0.1875)
    assert adjusted_rand_index(answer_maps(torch.stack(counts), 2, seed=0, prior=0.5 / 0.375).tolist(), truth) == 0.0


def test_the_client_starts_the_assignment_from_the_signatures_once(tmp_path, monkeypatch):
    """ClientTrainer.group round 1 with assign_start=signature: assign_experts gets the signature
    groups as its start; a client holding fewer users than experts refuses, naming the option."""
    import client.group as group_side
    from client.trainer import ClientTrainer
    from shared.data.lamp import task_spec
    from shared.runtime.config import load_config
    users, truth = _users()
    overrides = ["adapters.k=2", "group.constraint_form=assign", "group.assign_start=signature",
                 "group.signature_codes=2", "train.max_len=64", "group.rounds=2"]
    cfg = load_config("tiny", overrides)
    starts = []
    real = group_side.assign_experts

    returned = []

    def spy(model, tok, us, c, seed, start=None, fixed=False):
        starts.append(None if start is None else start.clone())
        returned.append(real(model, tok, us, c, seed, start, fixed))
        return returned[-1]
    monkeypatch.setattr(group_side, "assign_experts", spy)
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


def test_federated_em_is_the_em_of_one_client_holding_every_user():
    """Sums over clients are sums over users: split in any way, the federation fits the same maps
    and gives every user the group one client holding all of them gives; and it finds the groups."""
    from shared.method import signature_sums as S
    from shared.method.answer_signatures import answer_maps
    gen = torch.Generator().manual_seed(0)
    maps = [torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.5, 0.5]]),     # p(answer | kind) of group 0
            torch.tensor([[0.05, 0.95], [0.95, 0.05], [0.5, 0.5]])]     # and of group 1
    keys, rows, truth = [], [], []
    for u in range(12):
        g, n = u % 2, 4 + u % 4
        kinds = torch.randint(0, 3, (n,), generator=gen)
        answers = torch.multinomial(maps[g][kinds], 1, generator=gen).view(-1)
        rows.append(S.user_counts(kinds, answers, torch.zeros(n, dtype=torch.long), 1, 3, 2)[0])
        keys.append(f"user{u}")
        truth.append(g)
    counts = torch.stack(rows)
    whole = S.federated_answer_maps([(keys, counts)], k=2, seed=3, prior=0.5)[0]
    clients = [(keys[:5], counts[:5]), (keys[5:6], counts[5:6]), (keys[6:], counts[6:])]
    split = S.federated_answer_maps(clients, k=2, seed=3, prior=0.5)
    assert torch.equal(torch.cat(split), whole)
    # the users' groups are those of the centralized fit (up to their numbering), and the true ones
    assert adjusted_rand_index(whole.tolist(), answer_maps(counts, 2, seed=3, prior=0.5).tolist()) == 1.0
    assert adjusted_rand_index(whole.tolist(), truth) == 1.0
    # k-means' sufficient statistics add up the same way
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    c = x[:3].clone()
    one, parts = S.code_stats(x, c), [S.code_stats(x[:7], c), S.code_stats(x[7:], c)]
    assert all(torch.allclose(one[key], parts[0][key] + parts[1][key]) for key in one)


def test_a_federation_runs_the_signature_rounds_and_each_client_keeps_its_users_groups(tmp_path, monkeypatch):
    """proper sim with group.assign_start=signature: the server's signature rounds reach every
    client, each client keeps its users' groups on its own disk and starts the group stage's
    assignment from them; the replies carry sums and no user id; the checkpoint keeps the result
    (part "signature"), so a resumed run does not redo the rounds."""
    import json
    from pathlib import Path

    import client.signature_replies as client_signature
    from shared.data.synthetic import write_synthetic_lamp
    from shared.runtime.persist import load_tensors
    from sim.run import run_sim
    data = write_synthetic_lamp(tmp_path / "syn", n_users=6, n_groups=2, min_profile=3, max_profile=5, seed=0)
    started, real = [], client_signature.kept_groups

    def spy(trainer):   # the in-process engine runs the clients here: what each one starts from
        started.append(({u.user_id for u in trainer.trained}, real(trainer)))
        return started[-1][1]
    monkeypatch.setattr(client_signature, "kept_groups", spy)
    rc = run_sim("tiny", [f"data.path={data}", f"output.dir={tmp_path / 'runs'}", "simulation.engine=inprocess",
                          "adapters.k=2", "group.constraint_form=assign", "group.assign_start=signature",
                          "group.reassign=false", "group.signature_codes=3", "federation.audit_replies=true"])
    assert rc == 0
    run = next((tmp_path / "runs").iterdir())
    groups = {}
    for f in sorted(run.glob("clients/*/signature/groups.json")):
        groups.update(json.loads(f.read_text()))
    assert len(groups) == 6 and set(groups.values()) <= {0, 1}
    progress = json.loads((run / "checkpoint" / "progress.json").read_text())
    assert any(step.endswith("signature-assign") for step in progress["participation"])
    state, _ = load_tensors(run / "checkpoint" / progress["tensors"])
    assert {"signature/centroids", "signature/log_maps", "signature/log_prior", "signature/mean"} <= set(state)
    assert "adjusted Rand index" in (run / "table.md").read_text()     # the group recovery line
    assert state["signature/centroids"].shape[0] == 3 and state["signature/log_maps"].shape[0] == 2
    wire = "\n".join(p.read_text() for p in Path(run / "wire").rglob("*") if p.is_file())
    assert "query.signature" in wire
    assert not any(uid in wire for uid in groups)                           # no user id crossed the wire
    # every client's group stage started its assignment from its users' kept groups
    assert set().union(*(ids for ids, _ in started)) == set(groups)
    assert all(sorted(g.tolist()) == sorted(groups[u] for u in ids) for ids, g in started)


def test_a_federation_refuses_signature_starts_for_free_text_answers(tmp_path):
    """Free-text answers are quantised by a k-means over every user's answers, which the federated
    rounds do not do: a federation on a generation task refuses before starting, naming the option."""
    from shared.data.lamp import task_spec
    from shared.method.signature_start import refuse_in_federation
    from shared.runtime.config import ConfigError, load_config
    signature = load_config("tiny", ["group.assign_start=signature"])
    refuse_in_federation(load_config("tiny", []), task_spec("LaMP_4"))   # the default: nothing to refuse
    refuse_in_federation(signature, task_spec("LaMP_2"))                  # label answers: federated
    with pytest.raises(ConfigError, match="assign_start=signature"):
        refuse_in_federation(signature, task_spec("LaMP_4"))


def test_a_kept_assignment_starts_each_users_embedding_at_its_experts_code(tmp_path):
    """group.reassign=false: a user's first e_u is its expert's code plus a smaller share of its own
    draw (group.embedding_start=expert), so users of one expert start closer than users of two;
    embedding_start=random keeps the user's own draw."""
    from client.trainer import ClientTrainer, expert_embedding, initial_embedding
    from shared.data.lamp import task_spec
    from shared.runtime.config import load_config
    users, _ = _users()
    overrides = ["adapters.k=2", "group.constraint_form=assign", "group.assign_start=signature",
                 "group.signature_codes=2", "train.max_len=64", "group.reassign=false"]
    spec = task_spec("LaMP_2")
    for start in ("expert", "random"):
        cfg = load_config("tiny", [*overrides, f"group.embedding_start={start}"])
        client = ClientTrainer(cfg, spec, users, str(tmp_path / start))
        client.group(client.initial("population"), None, None, 1)
        groups = client._signature_start.tolist()
        first = [client.store.load(u.user_id, "embedding")["e_u_before"] for u in users]
        for u, g, e in zip(users, groups, first):
            want = expert_embedding(cfg.seed, u.user_id, client.model.d_user, g) if start == "expert" else \
                initial_embedding(cfg.seed, u.user_id, client.model.d_user)
            assert torch.equal(e, want)
    d = 64
    same = torch.nn.functional.cosine_similarity(expert_embedding(0, "a", d, 1), expert_embedding(0, "b", d, 1), 0)
    other = torch.nn.functional.cosine_similarity(expert_embedding(0, "a", d, 1), expert_embedding(0, "b", d, 0), 0)
    assert same > 0.6 and abs(other) < 0.5
    assert not torch.equal(expert_embedding(0, "a", d, 1), expert_embedding(0, "b", d, 1))   # still the user's own


def test_the_server_runs_signature_rounds_only_where_an_assignment_starts_from_them():
    from shared.method.signature_start import uses_signature_start
    from shared.runtime.config import load_config
    sig = ["group.assign_start=signature", "group.constraint_form=assign"]
    assert uses_signature_start(load_config("tiny", sig))
    assert not uses_signature_start(load_config("tiny", ["group.assign_start=signature"]))      # pairs form
    assert not uses_signature_start(load_config("tiny", [*sig, "method=loramoe"]))              # no user router


def test_only_the_assign_form_with_a_user_router_has_an_assignment():
    from shared.method.plan import uses_assignment
    from shared.runtime.config import load_config
    assert uses_assignment(load_config("tiny", ["group.constraint_form=assign"]))
    assert not uses_assignment(load_config("tiny", []))                                          # pairs
    assert not uses_assignment(load_config("tiny", ["group.constraint_form=balance"]))
    assert not uses_assignment(load_config("tiny", ["group.constraint_form=assign", "method=loramoe"]))


def test_the_first_pool_is_gathered_only_where_the_constraint_reads_it():
    """group.initial_pool costs a forward pass per client; the assign form reads no pool."""
    from shared.method.plan import initial_pool
    from shared.runtime.config import load_config
    assert initial_pool(load_config("tiny", []))                                               # pairs
    assert initial_pool(load_config("tiny", ["group.constraint_form=balance"]))
    assert not initial_pool(load_config("tiny", ["group.constraint_form=assign"]))
    assert not initial_pool(load_config("tiny", ["group.initial_pool=false"]))
    assert not initial_pool(load_config("tiny", ["method=loramoe"]))


def test_answers_outside_the_answer_set_are_refused_not_grouped():
    """LaMP_1's answers (titles), or labels unlike the task's, count nothing: refuse, naming the option."""
    from shared.method import signature_sums as S
    readings = torch.randn(10, 4)
    spec_labels = 3
    known = S.read_stats(readings, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, -1]), spec_labels)
    S.check_answers(known)
    unknown = S.read_stats(readings, torch.tensor([0, 1, -1, -1, -1, -1, -1, -1, -1, -1]), spec_labels)
    with pytest.raises(ValueError, match="assign_start=random"):
        S.check_answers(unknown)


def test_a_client_that_missed_the_signature_rounds_starts_from_the_hash(tmp_path, caplog):
    from client.signature_replies import kept_groups
    from client.trainer import ClientTrainer
    from shared.data.lamp import task_spec
    from shared.runtime.config import load_config
    users, _ = _users()
    cfg = load_config("tiny", ["adapters.k=2", "group.constraint_form=assign", "group.assign_start=signature"])
    client = ClientTrainer(cfg, task_spec("LaMP_2"), users, str(tmp_path / "state"))
    with caplog.at_level("WARNING"):
        assert kept_groups(client) is None
    assert "seeded hash" in caplog.text


def test_the_signature_bench_clusters_one_user_per_client_as_a_federation_would():
    """bench/signature_start.py: from item readings (here hand-made: 4 kinds of input, 4 answers, two
    groups answering each kind differently) both its centralized and its one-user-per-client
    federated clustering find the groups, whatever the order the items come in."""
    from bench.signature_start import centralized, federated
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 32, generator=gen), dim=1) * 3
    inp, answers, who, truth = [], [], [], []
    for u in range(16):
        g, n = u % 2, 3 + u % 5
        kinds = torch.randint(0, 4, (n,), generator=gen)
        inp.append(centres[kinds] + 0.05 * torch.randn(n, 32, generator=gen))
        answers.append((kinds + g) % 4)          # group 1 gives kind i the answer group 0 gives kind i + 1
        who.append(torch.full((n,), u))
        truth.append(g)
    inp, answers, who = torch.cat(inp), torch.cat(answers), torch.cat(who)
    shuffle = torch.randperm(len(who), generator=gen)
    inp, answers, who = inp[shuffle], answers[shuffle], who[shuffle]
    keys = [f"u{u}" for u in range(16)]
    assert adjusted_rand_index(centralized(inp, answers, who, 16, 4, k=2, codes=4, seed=0, prior=0.5), truth) == 1.0
    assert adjusted_rand_index(federated(inp, answers, who, keys, 4, k=2, codes=4, seed=0, prior=0.5), truth) == 1.0


def test_federated_em_stops_once_no_start_moves():
    """The server's EM runs until converged (em_converged), not a fixed number of rounds."""
    from shared.method.signature_sums import EM_TOL, em_converged
    ll = torch.tensor([-1000.0, -2000.0], dtype=torch.float64)
    assert not em_converged(None, ll)                                    # the first round has nothing to compare
    assert em_converged(ll, ll + torch.tensor([0.5, 1.0]) * EM_TOL * 1000)   # both within the tolerance
    assert not em_converged(ll, ll + torch.tensor([0.0, 0.01]))          # one start still moving


def test_the_signature_bench_reuses_its_cached_readings_only_for_the_same_population_and_data(tmp_path):
    """bench/signature_start.py source_key: readings cached from one population LoRA are not read back
    for another LoRA (a file or a PEFT folder) or another data set."""
    from bench.signature_start import source_key
    lora = tmp_path / "population.safetensors"
    lora.write_bytes(b"one")
    key = source_key(lora, tmp_path / "data")
    assert source_key(lora, tmp_path / "data") == key
    assert source_key(lora, tmp_path / "other") != key
    lora.write_bytes(b"two")
    assert source_key(lora, tmp_path / "data") != key
    folder = tmp_path / "population_lora"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"one")
    first = source_key(folder, tmp_path / "data")
    (folder / "adapter_model.safetensors").write_bytes(b"three")
    assert source_key(folder, tmp_path / "data") != first
