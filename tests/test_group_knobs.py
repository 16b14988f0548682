"""The group stage's user-routing knobs (adapters.router_u_init, group.user_lr_scale) and the
group-ablation bench that measures them (bench/group_ablation.py)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from shared.data.synthetic import write_synthetic_lamp
from shared.method.stages import group_param_groups
from shared.runtime.config import stage_defaults
from tests.helpers import make_model


def _router_u(model) -> torch.Tensor:
    return torch.cat([layer.router_u.flatten() for _, layer in model.layers()])


def test_router_u_init_sets_the_user_part_scale_only():
    from shared.method.model import ProperModel
    from shared.runtime.backbone import load_backbone
    from shared.runtime.targets import find_target_modules
    small, _ = make_model()
    lm, _ = load_backbone("tiny", seed=0)
    big = ProperModel(lm, find_target_modules(lm), k=5, d_user=16, router_u_init=0.5, seed=0)
    assert abs(float(_router_u(small).std()) - 0.02) < 0.004
    assert abs(float(_router_u(big).std()) - 0.5) < 0.1
    # the token part W_h keeps its own initialisation
    h_small = torch.cat([layer.router_h.flatten() for _, layer in small.layers()])
    h_big = torch.cat([layer.router_h.flatten() for _, layer in big.layers()])
    assert torch.equal(h_small, h_big)


def test_user_lr_scale_puts_w_u_and_the_embeddings_in_their_own_group():
    model, _ = make_model()
    model.merge_population()
    model.set_stage("group", train=True)
    emb = torch.nn.Parameter(torch.zeros(3, 16))
    one = group_param_groups(model, emb, True, stage_defaults(lr=1e-3, user_lr_scale=1.0))
    assert len(one) == 1 and one[0]["params"][-1] is emb
    assert len(one[0]["params"]) == len(model.trainable_parameters()) + 1
    two = group_param_groups(model, emb, True, stage_defaults(lr=1e-3, user_lr_scale=10.0))
    rest, user = two
    assert user["lr"] == 1e-2 and "lr" not in rest
    assert any(p is emb for p in user["params"])
    w_u = {id(layer.router_u) for _, layer in model.layers()}
    assert {id(p) for p in user["params"]} == w_u | {id(emb)}
    assert not w_u & {id(p) for p in rest["params"]}
    assert len(rest["params"]) + len(user["params"]) == len(model.trainable_parameters()) + 1


def test_group_ablation_reports_recovery_and_peakedness(tmp_path):
    from bench.group_ablation import main
    data = tmp_path / "syn"
    write_synthetic_lamp(data, n_users=6, n_groups=2, min_profile=4, max_profile=6, seed=0)
    out = tmp_path / "abl"
    main(["-c", "tiny", "--data", str(data), "--out", str(out), "--splits", "val",
          "--variant", "base=", "--variant", "peaked=adapters.router_u_init=0.5",
          "--variant", "history=start=history", "data.holdout=1"])
    rows = json.loads((out / "group_ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "peaked", "history"]
    for r in rows:
        assert r["users"] == 6 and -1.0 <= r["ari"] <= 1.0 and 0.0 <= r["scores"]["val"] <= 1.0
    # a large W_u at init routes each user mostly to one expert; the default starts near uniform
    assert rows[0]["dominant_weight"] < 0.3 < rows[1]["dominant_weight"]
    assert (out / "population.safetensors").exists()
    assert "| peaked |" in (out / "group_ablation.md").read_text()
    assert all((out / f"mixtures_{v}.png").stat().st_size > 0 for v in ("base", "peaked", "history"))
    assert "_mixtures" not in rows[0]


def test_layer_recovery_sees_groups_that_layer_averaging_hides():
    """Each layer routes the users by their group, but every layer numbers its experts its own way:
    averaged over layers the mixtures look uniform and the dominant expert says nothing, while each
    layer on its own recovers the groups exactly."""
    import numpy as np

    from shared.evaluation.groups import adjusted_rand_index, dominant_experts, layer_recovery
    true = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    k, layers = 3, 6
    m = np.zeros((len(true), layers, k))
    for layer in range(layers):
        perm = np.roll(np.arange(k), layer)               # layer l calls group g's expert perm[g]
        for u, g in enumerate(true):
            m[u, layer] = 0.1 / (k - 1)
            m[u, layer, perm[g]] = 0.9
    rec = layer_recovery(m, true)
    assert rec["ari_layer_mean"] == rec["ari_layer_max"] == 1.0
    assert abs(rec["peak_layer"] - 0.9) < 1e-9
    assert np.allclose(m.mean(1), 1 / k)                  # layer-averaged: exactly uniform
    assert adjusted_rand_index(dominant_experts(m), true) < 0.5
    # one layer that does not separate the groups lowers the mean, not the max
    m[:, 0] = 1 / k
    rec = layer_recovery(m, true)
    assert rec["ari_layer_max"] == 1.0 and rec["ari_layer_mean"] < 1.0


def test_history_embeddings_start_alike_users_alike(tmp_path):
    """The bench's data-derived e_u: users with the same history get the same start, others not,
    each at the norm of the usual N(0, I) start."""
    import copy

    from bench.group_ablation import history_embeddings
    from client.trainer import ClientTrainer, load_users
    from shared.runtime.config import load_config
    data = tmp_path / "syn"
    write_synthetic_lamp(data, n_users=3, n_groups=2, min_profile=4, max_profile=6, seed=0)
    cfg = load_config("tiny", [f"data.path={data}"])
    spec, users = load_users(cfg)
    twin = copy.deepcopy(users[0])
    twin.user_id = "twin"
    client = ClientTrainer(cfg, spec, users + [twin], str(tmp_path / "state"))
    pop = client.population(None, 1).shared
    e = history_embeddings(client, pop, 16, seed=0)
    assert e.shape == (4, 16)
    assert torch.allclose(e.norm(dim=1), torch.full((4,), 4.0), atol=1e-4)
    assert torch.allclose(e[0], e[3], atol=1e-5) and not torch.allclose(e[0], e[1], atol=1e-2)


def test_a_tied_user_router_is_one_w_u_that_stays_one_through_training_and_exchange(tmp_path):
    """adapters.tie_user_router: every layer holds the same W_u object; a group round trains it as
    one parameter (the same values in every layer afterwards, moved from the start); the exchanged
    state names it per layer, all equal, and loads back into the one object; the rest of the
    model is initialised exactly as without the tie."""
    from shared.data.lamp import load_lamp
    from shared.data.synthetic import write_synthetic_lamp as synth
    from shared.method.model import ProperModel
    from shared.method.stages import train_group
    from shared.runtime.backbone import load_backbone
    from shared.runtime.targets import find_target_modules
    lm, tok = load_backbone("tiny", seed=0)
    tied = ProperModel(lm, find_target_modules(lm), k=3, d_user=16, tie_user_router=True, seed=0)
    untied, _ = make_model(k=3)
    first = tied.layers()[0][1].router_u
    assert all(layer.router_u is first for _, layer in tied.layers())
    for part in ("population", "user"):
        a, b = tied.part_state(part), untied.part_state(part)
        assert all(torch.equal(a[key], b[key]) for key in a)
    tied.merge_population()
    _, users = load_lamp(synth(tmp_path / "syn", n_users=4, n_groups=2, min_profile=3, max_profile=4, seed=0))
    before = first.detach().clone()
    cfg = stage_defaults(lr=1e-2, epochs=1, batch_size=4, max_len=64, bf16=False,
                            constraint_weight=0.1, user_lr_scale=10.0)
    res, _ = train_group(tied, tok, users, torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), cfg)
    state = res.shared
    w_u = [v for key, v in state.items() if key.endswith(".router_u")]
    assert len(w_u) == len(tied.layers()) and all(torch.equal(w, w_u[0]) for w in w_u)
    assert not torch.equal(w_u[0], before)
    tied.load_part_state("group", {k: (v * 0 + 1 if k.endswith(".router_u") else v) for k, v in state.items()})
    assert torch.equal(first, torch.ones_like(first)) and all(layer.router_u is first for _, layer in tied.layers())
    # copies made to differ (the server's DP noise lands on each independently): the one W_u is their mean
    noisy = {k: v + (torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) if k.endswith(".router_u") else 0)
             for i, (k, v) in enumerate(state.items())}
    tied.load_part_state("group", noisy)
    mean = torch.stack([noisy[k].double() for k in noisy if k.endswith(".router_u")]).mean(0).float()
    assert torch.equal(first, mean) and not torch.equal(first, noisy[next(k for k in noisy if k.endswith(".router_u"))])


def test_the_balance_constraint_rewards_decisive_evenly_spread_users_not_distinct_pairs(tmp_path):
    """group.constraint_form=balance: mean_u H(p_u) - H(mean_u p_u) in units of log k. Users of one
    group sharing an expert cost nothing as long as the experts are evenly used (the pairwise
    cosine punishes exactly that); uniform routing scores 0; the pool of others joins the marginal;
    the form reaches train_group from the config, and the schema refuses an unknown form."""
    import pytest

    from shared.data.lamp import load_lamp
    from shared.method.stages import balance_loss, constraint_loss, train_group
    from shared.runtime.config import ConfigError, load_config
    eye = torch.eye(2).view(2, 1, 2)                                   # [U, L, k]: one-hot users
    shared_experts = eye[[0, 0, 1, 1]]                                 # two groups of two
    assert torch.isclose(balance_loss(shared_experts), torch.tensor(-1.0))
    assert torch.isclose(balance_loss(eye[[0, 1, 0, 1]]), torch.tensor(-1.0))
    assert constraint_loss(shared_experts) > constraint_loss(eye[[0, 1]])   # pairs: sharing costs
    assert torch.isclose(balance_loss(torch.full((3, 4, 5), 0.2)), torch.tensor(0.0), atol=1e-6)
    one = eye[[0]]
    assert torch.isclose(balance_loss(one, eye[[0, 0]]), torch.tensor(0.0), atol=1e-6)   # all on one expert
    assert torch.isclose(balance_loss(one, eye[[1]]), torch.tensor(-1.0))                # others elsewhere
    p = torch.tensor([[[0.6, 0.4]]], requires_grad=True)
    balance_loss(p, eye[[0, 0, 0]]).backward()
    assert p.grad[0, 0, 1] < p.grad[0, 0, 0]      # the under-used expert is the way down

    model, tok = make_model(k=3)
    model.merge_population()
    _, users = load_lamp(write_synthetic_lamp(tmp_path / "syn", n_users=4, n_groups=2, min_profile=3,
                                              max_profile=4, seed=0))
    emb = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    cons = {}
    for form in ("pairs", "balance"):
        model.reset_part("group", seed=0)
        cfg = stage_defaults(lr=1e-2, epochs=1, batch_size=4, max_len=64, bf16=False,
                                constraint_weight=0.1, constraint_form=form)
        cons[form] = train_group(model, tok, users, emb, cfg)[0].metrics["constraint_loss"]
    assert 0 < cons["pairs"] <= 1 and -1 <= cons["balance"] <= 0
    with pytest.raises(ConfigError, match="constraint_form"):
        load_config(None, ["group.constraint_form=entropy"])


def test_assignment_by_loss_starts_random_then_follows_the_experts_and_pulls_the_router(tmp_path):
    """group.constraint_form=assign (IFCA): while every expert's B is 0 the users draw their expert
    from a seeded hash; expert_losses is answer_loss with every layer routed to one expert; training
    with the assignment as the router's target puts more of each user's weight on its expert than
    the pairwise constraint does."""
    import pytest

    from shared.data.encode import encode_users, make_batches
    from shared.data.lamp import load_lamp
    from shared.method.stages import answer_loss, assign_experts, assignment_loss, expert_losses, train_group
    p = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])
    assert assignment_loss(p, torch.tensor([0, 2])) == 0
    uniform = torch.full((2, 4, 3), 1 / 3)
    assert torch.isclose(assignment_loss(uniform, torch.tensor([0, 1])), torch.log(torch.tensor(3.0)))

    model, tok = make_model(k=3)
    model.merge_population()
    _, users = load_lamp(write_synthetic_lamp(tmp_path / "syn", n_users=6, n_groups=2, min_profile=3,
                                              max_profile=4, seed=0))
    cfg = stage_defaults(lr=2e-2, epochs=3, batch_size=4, max_len=64, bf16=False,
                            constraint_weight=1.0, constraint_form="assign")
    start = assign_experts(model, tok, users, cfg, seed=0)
    assert torch.equal(start, assign_experts(model, tok, users, cfg, seed=0)) and ((start >= 0) & (start < 3)).all()
    assert len(set(start.tolist())) > 1          # a draw, not one expert for everyone
    emb = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="assign"):
        train_group(model, tok, users, emb, cfg)
    weight_on = {}
    for form in ("pairs", "assign"):
        model.reset_part("group", seed=0)
        c = OmegaConf.merge(cfg, {"constraint_form": form})
        _, _, by_user = train_group(model, tok, users, emb, c, assignment=start, return_user_mixtures=True)
        weight_on[form] = by_user.mean(1).gather(1, start.view(-1, 1)).mean().item()
    assert weight_on["assign"] > weight_on["pairs"] + 0.05
    # the experts now differ: the assignment is the argmin of the users' losses, each loss being
    # answer_loss over the user's history with every layer routed to that expert
    losses = expert_losses(model, tok, users, cfg)
    assert torch.equal(assign_experts(model, tok, users, cfg, seed=0), losses.argmin(1))
    model.set_stage("group")
    items = encode_users(tok, users[:1], 64)
    ids, mask, labels, _ = next(make_batches(items, 64, tok.pad_token_id, None))
    for e in range(3):
        alone = torch.nn.functional.one_hot(torch.full((len(model.layer_names),), e), 3).float()
        with torch.no_grad(), model.fixed_mixture(alone):
            assert torch.isclose(losses[0, e], answer_loss(model.lm, ids, mask, labels), rtol=1e-5)


def test_assignment_starts_from_a_given_clustering_and_the_bench_reads_each_rounds_assignment(tmp_path):
    """assign_experts takes a given start (a clustering of the users) while the experts tie, and
    the loss once they differ; the bench's start=updates clusters the users' population-update
    signatures into that start and records the assignment's ARI against the groups per round."""
    from bench.group_ablation import cluster_signatures, main
    from shared.data.lamp import load_lamp
    from shared.method.stages import assign_experts, expert_losses
    model, tok = make_model(k=3)
    model.merge_population()
    _, users = load_lamp(write_synthetic_lamp(tmp_path / "syn", n_users=6, n_groups=2, min_profile=3,
                                              max_profile=4, seed=0))
    cfg = stage_defaults(batch_size=4, max_len=64, bf16=False)
    given = torch.tensor([2, 2, 0, 1, 0, 2])
    assert torch.equal(assign_experts(model, tok, users, cfg, 0, start=given), given)
    for _, layer in model.layers():   # experts that differ: the loss decides, the start is ignored
        torch.nn.init.normal_(layer.expert_B, std=0.5)
    assert torch.equal(assign_experts(model, tok, users, cfg, 0, start=given),
                       expert_losses(model, tok, users, cfg).argmin(1))
    # two clear directions, three users each: k-means by direction separates them
    base = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    sigs = torch.cat([base[0] * torch.tensor([[1.0], [2.0], [0.5]]), base[1] * torch.tensor([[1.0], [3.0], [0.7]])])
    labels = cluster_signatures(sigs, 2, seed=0)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]

    data = tmp_path / "syn2"
    write_synthetic_lamp(data, n_users=6, n_groups=2, min_profile=4, max_profile=6, seed=0)
    out = tmp_path / "abl"
    main(["-c", "tiny", "--data", str(data), "--out", str(out), "--splits", "val",
          "--variant", "upd=start=updates,group.constraint_form=assign,group.rounds=2", "data.holdout=1"])
    row = json.loads((out / "group_ablation.json").read_text())[0]
    assert -1.0 <= row["start_ari"] <= 1.0
    assert len(row["assignment_ari"]) == 2 and all(-1.0 <= a <= 1.0 for a in row["assignment_ari"])
    assert row["assignment_ari"][0] == row["start_ari"]   # round 1 starts from the clustering


def test_assignment_probe_items_are_kept_out_of_group_training_and_assign_the_user(tmp_path, monkeypatch):
    """group.assign_probe=n: each user's n seeded probe items are what the assignment is measured
    on, and the group stage trains on the rest; a user with n items or fewer keeps them all."""
    import client.group as group_side
    from client.trainer import ClientTrainer, load_users
    from shared.method.stages import split_probe
    from shared.runtime.config import load_config
    data = tmp_path / "syn"
    write_synthetic_lamp(data, n_users=4, n_groups=2, min_profile=5, max_profile=9, seed=0)
    cfg = load_config("tiny", [f"data.path={data}", "data.holdout=1", "group.constraint_form=assign",
                               "group.assign_probe=2"])
    spec, users = load_users(cfg)
    short = copy_with_train(users[0], users[0].train[:2])
    fit, probe = split_probe(users + [short], 2, seed=0)
    for u, f, p in zip(users, fit, probe):
        assert len(p.train) == 2 and len(f.train) == len(u.train) - 2
        assert sorted(x.id for x in f.train + p.train) == sorted(x.id for x in u.train)
    assert fit[-1].train == probe[-1].train == short.train        # too few items: no split
    from shared.data.canaries import is_canary
    from shared.data.lamp import Example
    canaried = copy_with_train(users[1], users[1].train[:3] + [
        Example(id=f"{users[1].user_id}/canary{j}", user=users[1].user_id, input="x", output="1 2") for j in range(20)])
    for s in range(10):   # 20 canary copies and 3 own items: the probes are always own items
        f, p = split_probe([canaried], 2, seed=s)
        assert len(p[0].train) == 2 and not any(is_canary(x) for x in p[0].train)
        assert sum(is_canary(x) for x in f[0].train) == 20
    assert [p.train for p in split_probe(users, 2, seed=0)[1]] == [p.train for p in probe[:-1]]
    assert [p.train for p in split_probe(users, 2, seed=1)[1]] != [p.train for p in probe[:-1]]

    seen = []
    real = group_side.assign_experts
    monkeypatch.setattr(group_side, "assign_experts",
                        lambda m, t, us, *a, **kw: seen.append(us) or real(m, t, us, *a, **kw))
    client = ClientTrainer(cfg, spec, users, str(tmp_path / "state"))
    pop = client.population(None, 1).shared
    res = client.group(pop, None, None, 1)
    assert [p.train for p in seen[0]] == [p.train for p in probe[:-1]]
    assert res.num_examples == sum(len(u.train) for u in users) - 2 * len(users)


def copy_with_train(user, train):
    import dataclasses
    return dataclasses.replace(user, user_id=user.user_id + "-short", train=list(train))


def two_theme_users():
    """Two hand-made synthetic LaMP_2 users: a tags space films sci-fi (twice) and a court film
    classic, and is asked a space and a court film (the court one answered drama); b tags a space
    film dystopia and is asked a space and a court film."""
    from shared.data.lamp import Example, User

    def ex(uid, j, words, tag):
        return Example(f"{uid}/{j}", uid, f"description: {words}.", tag)
    space, court = "a starship and a galaxy", "the jury and the trial"
    a = User("a", [ex("a", 0, space, "sci-fi"), ex("a", 1, space, "sci-fi"), ex("a", 2, court, "classic")],
             [ex("a", 3, space, "sci-fi"), ex("a", 4, court, "drama")], [])
    b = User("b", [ex("b", 0, space, "dystopia")], [ex("b", 1, space, "dystopia"), ex("b", 2, court, "classic")], [])
    return a, b


def test_the_group_oracle_answers_by_the_groups_majority_tag_per_theme():
    """bench/group_ablation.py group_oracle: the ceiling of a grouping on synthetic LaMP_2 users."""
    from bench.group_ablation import group_oracle
    a, b = two_theme_users()
    # a: space right, court wrong (the group says classic); b: space right, court unseen for its group
    assert group_oracle([a, b], {"a": 0, "b": 1}, "val") == 2 / 4
    # one group: space is sci-fi by 2 votes to 1, so b's space answer is now wrong, its court one right
    assert group_oracle([a, b], {"a": 0, "b": 0}, "val") == 2 / 4
    assert group_oracle([a, b], {"a": 0, "b": 0}, "test") is None


def test_the_error_breakdown_splits_the_group_stages_answers_by_what_the_oracle_and_population_say():
    """bench/group_ablation.py error_breakdown: where the group stage's answers go wrong."""
    from bench.group_ablation import error_breakdown
    a, b = two_theme_users()
    # group 1 has never tagged a court film: b's court item is left out. b's space item: the oracle
    # says dystopia, all groups together sci-fi (2 votes to 1), and the model answered sci-fi.
    out = error_breakdown([a, b], {"a": 0, "b": 1}, {"a": ["sci-fi", "classic"], "b": ["sci-fi", "x"]}, "val")
    assert out["items"] == 3 and out["accuracy"] == round(1 / 3, 3)
    assert out["at_oracle"] == round(2 / 3, 3) and out["at_overall"] == 1.0
    assert out["on_oracle_right"] == 0.5 and out["on_oracle_wrong"] == 0.0
    assert out["on_oracle_right_group_differs"] == 0.0 and out["on_oracle_right_group_same"] == 1.0
    assert out["on_oracle_right_size_0-4"] == [0.5, 2] and out["on_oracle_right_size_5-10"] == [None, 0]
    assert error_breakdown([a, b], {}, {"a": ["sci-fi", "x"]}, "val") is None


def test_the_truth_start_keeps_every_user_on_its_true_groups_expert(tmp_path):
    """bench/group_ablation.py start=truth: the group stage with a perfect grouping (its ceiling)."""
    from bench.group_ablation import main
    data = tmp_path / "syn"
    write_synthetic_lamp(data, n_users=6, n_groups=2, min_profile=4, max_profile=6, seed=0)
    out = tmp_path / "abl"
    main(["-c", "tiny", "--data", str(data), "--out", str(out), "--splits", "val", "--variant",
          "truth=start=truth,adapters.k=2,group.constraint_form=assign,group.reassign=false,group.rounds=2",
          "--every-round", "data.holdout=1"])
    row = json.loads((out / "group_ablation.json").read_text())[0]
    assert row["assignment_ari"] == [1.0, 1.0]          # the true groups, kept for both rounds
    assert len(row["by_round"]) == 2 and row["by_round"][-1] == row["scores"]["val"]   # a learning curve
    assert len(row["loss_by_round"]) == 2
    assert 0 < row["breakdown"]["val"]["items"] <= 6 and 0.0 <= row["breakdown"]["val"]["accuracy"] <= 1.0
    with pytest.raises(SystemExit, match="adapters.k >= 2"):
        main(["-c", "tiny", "--data", str(data), "--out", str(out), "--splits", "val", "--variant",
              "truth=start=truth,adapters.k=1,group.constraint_form=assign,group.reassign=false", "data.holdout=1"])
