"""Leakage audits (sim/audit.py, shared/evaluation/audit.py), canaries (shared/data/canaries.py) and
the group stage's mixtures channel (privacy.mixtures); tiny model."""
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from server.checkpoint import Checkpoint
from shared.data.canaries import choose_users, make_canaries, secret_text, with_canaries
from shared.data.lamp import Example, User
from shared.evaluation.audit import (
    exposure,
    extrapolated_exposure,
    membership_auc,
    rank_exposure,
    rank_of,
)
from shared.runtime.config import ConfigError, load_config
from sim.run import run_sim


# ---------------------------------------------------------------- exposure and AUC by hand
def test_exposure_of_a_hand_made_ranking():
    assert exposure(1, 1024) == 10.0 and exposure(1024, 1024) == 0.0 and exposure(2, 8) == 2.0
    with pytest.raises(ValueError):
        exposure(0, 8)
    # all of S but the secret scored: the rank is exact
    cands = [5.0, 1.0, 3.0, 7.0, 2.0, 6.0, 8.0]            # |S| = 8
    assert rank_of(4.0, cands) == 4                         # 1, 2, 3 below
    assert rank_of(2.0, cands) == 2                         # ties count for the secret
    assert rank_exposure(4.0, cands, 8) == (4.0, 1.0)
    assert rank_exposure(0.5, cands, 8) == (1.0, 3.0)       # the most likely: log2 |S|
    # sampled: 2 of 4 sampled candidates below the secret -> rank 1 + 9999 / 2
    rank, exp = rank_exposure(3.0, [1.0, 2.0, 4.0, 5.0], 10_000)
    assert rank == pytest.approx(1 + 9999 / 2) and exp == pytest.approx(math.log2(10_000) - math.log2(rank))
    # extrapolated: the median of the candidates is 1 bit, three sd below about -log2(0.00135)
    xs = [float(x) for x in range(-50, 51)]
    assert extrapolated_exposure(0.0, xs) == pytest.approx(1.0)
    sd = torch.tensor(xs).std().item()
    assert extrapolated_exposure(-3 * sd, xs) == pytest.approx(-math.log2(0.0013499), rel=1e-3)
    assert extrapolated_exposure(-60 * sd, xs) > 100    # far tail, no overflow


def test_membership_auc_of_hand_made_losses():
    assert membership_auc([0.1, 0.2], [0.5, 0.9]) == 1.0     # members' losses all lower
    assert membership_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert membership_auc([1.0, 1.0], [1.0, 1.0]) == 0.5     # ties: half
    assert membership_auc([0.1, 0.6], [0.5, 0.9]) == 0.75    # 3 of 4 pairs
    assert math.isnan(membership_auc([], [1.0]))


# ---------------------------------------------------------------- canaries
def test_canaries_are_seeded_and_go_only_into_their_users_training_items():
    ids = [f"u{i:03d}" for i in range(20)]
    a = make_canaries(ids, 3, repeats=5, digits=4, seed=1)
    assert a == make_canaries(list(reversed(ids)), 3, repeats=5, digits=4, seed=1)  # not the order of the list
    assert [c.user for c in a] == choose_users(ids, 3, 1) and len({c.user for c in a}) == 3
    assert a != make_canaries(ids, 3, repeats=5, digits=4, seed=2)
    assert all(len(c.secret.split()) == 4 and c.secret.replace(" ", "").isdigit() for c in a)
    assert secret_text(42, 4) == "0 0 4 2"
    ex = Example("x/0", "x", "in", "out")
    users = [User(i, [ex], [ex], [ex]) for i in ids]
    out = with_canaries(users, a)
    for u, v in zip(users, out):
        canary = [c for c in a if c.user == u.user_id]
        assert v.val == u.val and v.test == u.test
        assert len(v.train) == 1 + (5 if canary else 0)
        if canary:
            assert all(e.output == canary[0].secret for e in v.train[1:])


def test_mixtures_and_canaries_settings_are_checked():
    cfg = load_config("tiny")
    assert cfg.privacy.mixtures == "share" and cfg.privacy.canaries.users == 0
    with pytest.raises(ConfigError, match="privacy.mixtures"):
        load_config("tiny", ["privacy.mixtures=secret"])
    with pytest.raises(ConfigError, match="privacy.canaries.repeats"):
        load_config("tiny", ["privacy.canaries.repeats=0"])


def test_noised_mixtures_accounting():
    from server.privacy import epsilon, mixture_releases
    cfg = load_config("tiny", ["privacy.mixtures=noise", "privacy.mixture_noise=2", "group.rounds=2"])
    m = mixture_releases(cfg, layers=8)
    assert m["sensitivity"] == pytest.approx(4.0) and m["noise_multiplier"] == pytest.approx(0.5)
    assert m["releases"] == 3                           # two rounds and the first pool
    assert epsilon([(0.5, 3)], 1e-5) > epsilon([(1.0, 3)], 1e-5)
    assert mixture_releases(load_config("tiny"), 8) == {"mixtures": "share"}


# ---------------------------------------------------------------- runs
BASE = ["simulation.engine=inprocess", "eval.stages=[population,group,user]", "federation.audit_replies=true"]


def replies(run: Path) -> list[dict]:
    return [json.loads(line) for f in (run / "wire").glob("*.jsonl") for line in f.read_text().splitlines()]


@pytest.mark.slow
def test_defaults_leave_a_run_unchanged_and_local_mixtures_are_never_sent(tmp_path):
    """The new options at their defaults (and knobs that only act when switched on) end with the
    same parameters and table, bit for bit, as the defaults; privacy.mixtures=local sends no
    mixture (the reply audit) and trains."""
    base = [*BASE, f"output.dir={tmp_path}"]
    assert run_sim("tiny", [*base, "output.name=absent"]) == 0
    assert run_sim("tiny", [*base, "output.name=knobs", "privacy.mixtures=share", "privacy.mixture_noise=3",
                            "privacy.canaries.users=0", "privacy.canaries.repeats=7", "privacy.canaries.seed=9"]) == 0
    assert run_sim("tiny", [*base, "output.name=local", "privacy.mixtures=local"]) == 0
    _, ref = Checkpoint(tmp_path / "absent").load()
    _, got = Checkpoint(tmp_path / "knobs").load()
    for part in ("population", "group"):
        for k, v in ref[part].items():
            assert torch.equal(v, got[part][k]), (part, k)
    assert torch.equal(ref["mixtures"], got["mixtures"])

    def table(name):
        return json.loads((tmp_path / name / "table.json").read_text())
    assert table("absent") == table("knobs")
    shared = [r for r in replies(tmp_path / "absent") if r["message_type"] in ("train.group", "query.mixtures")]
    assert shared and all(r["arrays"]["routing"]["mixtures"]["shape"][0] == 1 for r in shared)
    local = [r for r in replies(tmp_path / "local") if r["message_type"] in ("train.group", "query.mixtures")]
    assert local and all(r["arrays"]["routing"]["mixtures"]["shape"][0] == 0 for r in local)   # [0, L, k]
    _, loc = Checkpoint(tmp_path / "local").load()
    assert loc["mixtures"] is None and loc["group"] is not None
    assert "never leave the clients" in (tmp_path / "local" / "table.md").read_text()


@pytest.mark.slow
def test_noised_mixtures_are_sent_noised(tmp_path):
    from client.trainer import ClientTrainer, load_users
    from shared.data.synthetic import write_synthetic_lamp
    data = write_synthetic_lamp(tmp_path / "data", n_users=2, n_groups=2, seed=0)
    cfg = load_config("tiny", [f"data.path={data}", "privacy.mixtures=noise", "privacy.mixture_noise=0.5",
                               "privacy.dp.seed=1"])
    spec, users = load_users(cfg)
    t = ClientTrainer(cfg, spec, users, str(tmp_path / "state"))
    mix = torch.full((50, 3, 5), 0.2)
    a, b = t.release.mixtures(mix, 1), t.release.mixtures(mix, 1)
    assert torch.equal(a, b) and (a - mix).std().item() == pytest.approx(0.5, rel=0.1)
    assert not torch.equal(t.release.mixtures(mix, 2), a)     # new noise every round
    local = OmegaConf.merge(cfg, {"privacy": {"mixtures": "local"}})
    assert ClientTrainer(local, spec, users, str(tmp_path / "local")).release.mixtures(mix, 1).shape == (0, 3, 5)
    # the routing mass (the group average's expert weights) would give a one-user client's mixture
    # away: under noise and local every expert is weighted by the reply's examples instead
    for how in ("share", "noise", "local"):
        t = ClientTrainer(OmegaConf.merge(cfg, {"privacy": {"mixtures": how}}), spec, users, str(tmp_path / how))
        r = t.group(t.initial("population", None), None, None, 1)
        flat = torch.equal(r.routing_mass, torch.full_like(r.routing_mass, float(r.num_examples)))
        assert flat == (how != "share") and r.num_examples > 0, how


@pytest.mark.slow
def test_a_memorized_canary_is_less_exposed_under_strong_noise(tmp_path):
    """A canary repeated 30 times, three population epochs at a high lr: without DP the tiny model
    ranks the secret first among the sampled candidates; with DP (noise multiplier 10, clip 0.1) the
    released population LoRA gives it away no more than chance does."""
    from sim.audit import run_audit
    opt = ["simulation.engine=inprocess", "eval.stages=[population]", "group.rounds=0", f"output.dir={tmp_path}",
           "privacy.canaries.users=1", "privacy.canaries.repeats=30", "privacy.canaries.candidates=63",
           "population.epochs=3", "population.lr=1e-2"]
    assert run_sim("tiny", [*opt, "output.name=plain"]) == 0
    assert run_sim("tiny", [*opt, "output.name=dp", "privacy.dp.noise_multiplier=10", "privacy.dp.clip=0.1",
                            "privacy.dp.seed=1"]) == 0
    plain, dp = run_audit(tmp_path / "plain"), run_audit(tmp_path / "dp")
    exposed = plain["views"]["population"]["exposure"]
    assert exposed > 10 and exposed - dp["views"]["population"]["exposure"] > 5
    assert json.loads((tmp_path / "plain" / "canaries.json").read_text())[0]["repeats"] == 30
    assert (tmp_path / "dp" / "audit.md").read_text().startswith("| model |")
    # fewer candidates on demand (`proper audit RUN --candidates 7`): the same canary ranked among 7
    coarse = run_audit(tmp_path / "plain", candidates=7)
    assert coarse["candidates"] == 7 and plain["candidates"] == 63
    assert [c["candidates"] for c in coarse["views"]["population"]["canaries"]] == [7]
    assert coarse["views"]["population"]["canaries"][0]["secret_nll"] == pytest.approx(
        plain["views"]["population"]["canaries"][0]["secret_nll"], rel=1e-5)     # the same canary and model
    with pytest.raises(ValueError, match="--candidates"):
        run_audit(tmp_path / "plain", candidates=0)
    # the canary stays on its client: neither its prompt nor its secret is in what the server wrote
    canary = json.loads((tmp_path / "plain" / "canaries.json").read_text())[0]
    for name in ("rounds.jsonl", "table.md", "table.json"):
        text = (tmp_path / "plain" / name).read_text()
        assert canary["secret"] not in text and canary["input"] not in text, name


def test_users_with_no_history_get_a_mixture_under_every_privacy_mixtures_setting():
    """share: the pool's mean as it is; noise: negative weights cut, rows summed to 1 again; local
    (no pool anywhere): every expert the same, not the random start of an e_u."""
    from server.stages.group import mean_mixture
    group = {f"l{i}.router_h": torch.zeros(3, 8) for i in range(4)}
    pool = torch.softmax(torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0)), -1)
    assert torch.equal(mean_mixture("share", pool, group, "proper"), pool.mean(0))
    noisy = pool + torch.randn(pool.shape, generator=torch.Generator().manual_seed(1))
    got = mean_mixture("noise", noisy, group, "proper")
    assert (got >= 0).all() and torch.allclose(got.sum(-1), torch.ones(4))
    assert (noisy.mean(0) < 0).any()      # the cut acted
    assert torch.equal(mean_mixture("local", None, group, "proper"), torch.full((4, 3), 1 / 3))
    assert mean_mixture("share", None, group, "proper") is None
