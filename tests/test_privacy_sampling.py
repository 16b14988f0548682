"""federation.sampling=poisson under privacy.dp: the accountant of the Poisson-subsampled Gaussian
(Flower's RdpAccountant) against closed forms and a published value, the secret draws, the fixed
denominator of the mean, and a tiny private run's account (docs/decisions.md "Privacy")."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from shared.runtime.config import ConfigError, load_config
from tests.test_privacy import DP, _replies, server_identity, stage_strategy  # noqa: F401 (a fixture)


def rdp_subsampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order alpha of the Poisson-subsampled Gaussian mechanism, add or remove one,
    sensitivity 1 (Mironov, Talwar and Zhang, 2019, "Renyi Differential Privacy of the Sampled
    Gaussian Mechanism", Section 3.3, integer alpha; the same as Abadi et al., 2016, Lemma 3's
    moment at lambda = alpha - 1): log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)))
    / (alpha - 1), summed here in log space."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0) + (k * k - k) / (2 * sigma * sigma)
             for k in range(alpha + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)


def test_the_accountant_matches_the_subsampled_gaussians_closed_form():
    from server.privacy import epsilon_sampled
    q, sigma, steps, delta = 0.01, 1.1, 10_000, 1e-5
    orders = tuple(float(a) for a in range(2, 257))
    # RDP adds up over steps; to (epsilon, delta) by the conversion the accountant uses (Canonne, Kamath
    # and Steinke, 2020; tests/test_privacy.py checks it on the plain Gaussian)
    by_hand = min(steps * rdp_subsampled_gaussian(q, sigma, int(a)) + math.log1p(-1 / a)
                  - math.log(delta * a) / (a - 1) for a in orders)
    assert epsilon_sampled([(sigma, steps, 1, 100)], delta, orders) == pytest.approx(by_hand, rel=1e-9)
    assert by_hand == pytest.approx(5.654, abs=1e-3)
    # q = 1 is the Gaussian mechanism: no amplification
    from server.privacy import epsilon
    assert epsilon_sampled([(1.3, 7, 5, 5)], 1e-3) == pytest.approx(epsilon([(1.3, 7)], 1e-3), rel=1e-12)
    # the same q stated over different populations (a federation whose clients came and went)
    assert epsilon_sampled([(sigma, 3, 1, 100), (sigma, 2, 2, 200)], delta) == \
        pytest.approx(epsilon_sampled([(sigma, 5, 1, 100)], delta), rel=1e-12)
    assert epsilon_sampled([(0.0, 1, 1, 10)], delta) == math.inf


def test_the_accountant_reproduces_abadi_et_al_2016():
    """Abadi et al., 2016, "Deep Learning with Differential Privacy", Section 3.1: q = 0.01, sigma = 4,
    delta = 1e-5, T = 10,000 steps: "epsilon ~ 1.26 using the moments accountant". The moments
    accountant's conversion of the same moments (min over lambda of (T alpha(lambda) + log(1/delta)) /
    lambda, lambda up to 32 as in their implementation) gives 1.26 by hand; Flower's accountant, whose
    conversion is tighter, must state no more."""
    from server.privacy import epsilon_sampled
    q, sigma, steps, delta = 0.01, 4.0, 10_000, 1e-5
    moments = min((steps * lam * rdp_subsampled_gaussian(q, sigma, lam + 1) + math.log(1 / delta)) / lam
                  for lam in range(1, 33))
    assert round(moments, 2) == 1.26
    eps = epsilon_sampled([(sigma, steps, 1, 100)], delta)
    assert 0.9 < eps <= moments


def test_poisson_sampling_is_secret_under_dp_and_seeded_otherwise():
    from server.strategies.chains import expected_clients, poisson_draw, round_nodes, sampled_nodes
    nodes = list(range(100, 300))
    cfg = load_config("tiny", ["federation.sampling=poisson", "federation.clients_per_round=20"])
    assert expected_clients(cfg, len(nodes)) == 20
    counts = [len(sampled_nodes(nodes, cfg, "population", r)) for r in range(1, 401)]
    assert sum(counts) / len(counts) == pytest.approx(20, rel=0.05)   # q N on average, not exactly
    assert len(set(counts)) > 5
    assert sampled_nodes(nodes, cfg, "group", 3) == sampled_nodes(nodes, cfg, "group", 3)   # no DP: the seed
    private = load_config("tiny", [*DP, "federation.sampling=poisson", "federation.fraction_train=0.1"])
    assert isinstance(poisson_draw(private, "population", 1), random.SystemRandom)
    assert expected_clients(private, len(nodes)) == 20
    draws = {tuple(sampled_nodes(nodes, private, "population", 1)) for _ in range(5)}
    assert len(draws) > 1                                   # the operating system's entropy: no seed repeats it
    fed = SimpleNamespace(cfg=private, nodes=lambda: nodes, round_samples={})
    assert round_nodes(fed, "group", 1) == round_nodes(fed, "group", 1)   # drawn once per round
    seeded = load_config("tiny", [*DP, "federation.sampling=poisson", "privacy.dp.seed=3"])
    assert not isinstance(poisson_draw(seeded, "population", 1), random.SystemRandom)
    shuffle = load_config("tiny", ["federation.clients_per_round=20"])
    assert all(len(sampled_nodes(nodes, shuffle, "population", r)) == 20 for r in range(1, 5))


def test_poisson_sampling_under_dp_needs_one_user_per_clipped_update():
    for bad in ("federation.chains=2", "federation.users_per_client=2"):
        with pytest.raises(ConfigError, match="federation.sampling"):
            load_config("tiny", [*DP, "federation.sampling=poisson", bad])
    load_config("tiny", ["federation.sampling=poisson", "federation.chains=2"])   # without DP: nothing to account
    with pytest.raises(ConfigError, match="federation.sampling"):
        load_config("tiny", ["federation.sampling=bernoulli"])


def test_the_mean_has_the_fixed_denominator_qn_and_its_noise_std_z_clip_over_qn(server_identity):  # noqa: F811
    """Poisson sampling: n = 3 replies, m = q N = 5 expected. Without noise the released update is
    the sum of the clipped updates over 5 (not their mean over 3); the noise has std z C / 5."""
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies.chains import NodesView
    keys = ("l.lora_A", "l.lora_B")
    g = torch.Generator().manual_seed(1)
    start = {k: torch.randn(2, 3, generator=g) for k in keys}
    updates = [{k: torch.randn(2, 3, generator=g) * s for k in keys} for s in (0.01, 3.0, 0.2)]

    def released(z: float, shape=None):
        base = {k: torch.zeros(shape) for k in keys} if shape else start
        ups = updates if shape is None else [{k: torch.full(shape, 1e-7) for k in keys}] * 3
        cfg = load_config("tiny", [f"privacy.dp.noise_multiplier={z}", "privacy.dp.clip=1.0", "privacy.dp.seed=5",
                                   "federation.sampling=poisson"])
        strategy = stage_strategy(cfg, "population")
        strategy.average.expected = 5
        list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord({"server-round": 1}), NodesView([4, 5, 6])))
        arrays, _ = strategy.aggregate_train(1, _replies("population", base, ups, [1, 1, 1]))
        return arrays.to_torch_state_dict(), base

    got, _ = released(0.0)
    for k in keys:
        clipped = []
        for u in updates:
            norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in u.values()))
            clipped.append(u[k].double() * min(1.0, 1.0 / norm))
        assert torch.allclose(got[k].double(), start[k].double() + sum(clipped) / 5, atol=1e-5), k
    noisy, base = released(3.0, shape=(50, 100))
    noise = torch.cat([(noisy[k].double() - 1e-7 * 3 / 5).flatten() for k in keys])
    assert float(noise.std()) == pytest.approx(3.0 * 1.0 / 5, rel=0.03)


def test_the_account_of_poisson_rounds():
    from server.privacy import epsilon_sampled, note_release, privacy_summary
    from server.state import Progress, SharedParts
    nodes = list(range(40))
    cfg = load_config("tiny", [*DP, "federation.sampling=poisson", "federation.clients_per_round=4"])
    fed = SimpleNamespace(cfg=cfg, nodes=lambda: nodes, round_samples={},
                          progress=Progress(participation={"eval:base": {"users": 40}}),
                          parts=SharedParts(), run_dir=SimpleNamespace(log=lambda r: None))
    note_release(fed, "population", 1, 3)
    note_release(fed, "population", 2, 0)   # an empty sample counts all the same
    note_release(fed, "group", 1, 5)
    s = privacy_summary(fed)
    assert s["sampling"] == "poisson" and s["delta"] == 1 / 40
    assert s["stages"]["population"]["sampling"]["q"] == pytest.approx(0.1)
    assert s["stages"]["population"]["epsilon"] == pytest.approx(epsilon_sampled([(1.0, 2, 4, 40)], 1 / 40))
    assert s["epsilon"] == pytest.approx(epsilon_sampled([(1.0, 3, 4, 40)], 1 / 40))
    assert s["unaccounted"] and all("/" in r for r in s["unaccounted"])


@pytest.mark.slow
def test_a_private_run_with_poisson_sampling_states_its_account(tmp_path):
    from sim.run import run_sim
    opt = ["simulation.engine=inprocess", "eval.stages=[population,group]", f"output.dir={tmp_path}",
           "output.name=p", *DP, "privacy.dp.seed=2", "federation.sampling=poisson", "federation.fraction_train=0.5",
           "group.rounds=2"]
    assert run_sim("tiny", opt) == 0
    records = [json.loads(line) for line in (tmp_path / "p" / "rounds.jsonl").read_text().splitlines()]
    privacy = next(r for r in records if r["kind"] == "privacy")
    assert privacy["sampling"] == "poisson" and privacy["stages"]["group"]["rounds"] == 2
    assert privacy["stages"]["population"]["sampling"] == {"method": "poisson", "expected": 2, "population": 4,
                                                           "q": 0.5}
    table = (tmp_path / "p" / "table.md").read_text()
    assert "amplified by Poisson sampling" in table and "q = 2/4" in table
    assert "releases not covered by the epsilon above" in table and "| train.group | routing | mixtures |" in table


def test_delta_counts_every_user_when_only_a_sample_is_evaluated():
    """delta = 1 / N: with eval.clients a run evaluates a sample, whose count would state a larger
    delta and so a smaller epsilon than the federation's users allow."""
    from server.privacy import users_counted
    progress = SimpleNamespace(evaluations=lambda: [{"users": 2}], participation={})
    every = SimpleNamespace(cfg=load_config("tiny", []), progress=progress, users_in_federation=lambda: 6)
    assert users_counted(every) == 2                 # every user evaluated: the evaluations' count
    sample = SimpleNamespace(cfg=load_config("tiny", ["eval.clients=2"]), progress=progress,
                             users_in_federation=lambda: 6)
    assert users_counted(sample) == 6
