"""privacy.dp: clipping, noise, the accountant, and a run without DP left as it was (tiny model)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from server.checkpoint import Checkpoint
from shared.runtime.config import ConfigError, load_config
from sim.run import run_sim

DP = ["privacy.dp.noise_multiplier=1.0", "privacy.dp.clip=0.5"]


def stage_strategy(cfg, stage: str):
    """A stage's server optimizer over its average, as server/stages/ builds it (no pool, no population)."""
    from server.strategies import average_settings, dp_settings, make_strategy
    from server.strategies.group import GroupAverage
    from server.strategies.population import PopulationAverage
    if stage == "population":
        return make_strategy(cfg, stage, PopulationAverage(**average_settings(cfg)))
    average = GroupAverage(None, None, int(cfg.seed), uniform_weights=dp_settings(cfg) is not None,
                           **average_settings(cfg))
    return make_strategy(cfg, stage, average)


@pytest.fixture
def server_identity():
    """Messages made outside a run need the identity a ServerApp has (as sim/inprocess.py sets it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def norm_of_update(after, before) -> float:
    return math.sqrt(sum(float(((after[k].numpy().astype("float64") - before[k].numpy()) ** 2).sum())
                         for k in before.keys()))


# ---------------------------------------------------------------- configuration
def test_dp_is_off_by_default_and_its_settings_are_checked():
    from server.strategies.privacy import PrivateAverage
    cfg = load_config("tiny")
    assert cfg.privacy.dp.noise_multiplier is None
    assert not isinstance(stage_strategy(cfg, "population").average, PrivateAverage)
    assert isinstance(stage_strategy(load_config("tiny", DP), "group").average, PrivateAverage)
    with pytest.raises(ConfigError, match="privacy.dp.clip"):
        load_config("tiny", ["privacy.dp.noise_multiplier=1"])
    with pytest.raises(ConfigError, match="privacy.dp.clipping"):
        load_config("tiny", [*DP, "privacy.dp.clipping=client", "federation.chains=2"])
    with pytest.raises(ConfigError, match="method=mta"):
        load_config("tiny", [*DP, "method=mta"])
    with pytest.raises(ConfigError, match="privacy.dp.clipping"):
        load_config("tiny", [*DP, "privacy.dp.clipping=both"])
    with pytest.raises(ConfigError, match="privacy.dp.delta"):
        load_config("tiny", [*DP, "privacy.dp.delta=1"])


# ---------------------------------------------------------------- clipping
def test_client_side_clipping_bounds_each_replys_update_norm(tmp_path, monkeypatch, server_identity):
    """privacy.dp.clipping=client: the real ClientApp on the tiny model, population (Flower's
    fixedclipping_mod) and group (the joint update of experts and routers)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from client.client_app import app
    from sim.inprocess import InProcessGrid
    from sim.run import prepare_run
    clip = 0.01
    run_dir = prepare_run("tiny", [f"output.dir={tmp_path}", "output.name=clip", "privacy.dp.noise_multiplier=1",
                                   f"privacy.dp.clip={clip}", "privacy.dp.clipping=client"], None)
    monkeypatch.setenv("PROPER_RUN_DIR", str(run_dir))
    grid = InProcessGrid(app, 4)
    nodes = list(grid.get_node_ids())

    def ask(content: dict, kind: str, node: int):
        (reply,) = grid.send_and_receive([Message(RecordDict(content), dst_node_id=node, message_type=kind)])
        assert not reply.has_error(), reply.error.reason
        return reply.content

    population = ask({"config": ConfigRecord({"part": "population"})}, "query.init", nodes[0])["arrays"]
    group = ask({"config": ConfigRecord({"part": "group"}), "population": population}, "query.init", nodes[0])["arrays"]
    for kind, content in (("train.population", {"arrays": population}),
                          ("train.group", {"arrays": group, "population": population})):
        for node in nodes:
            norms = {}
            for asked in (True, False):
                config = ConfigRecord({"server-round": 1, **({"clipping_norm": clip} if asked else {})})
                reply = ask({**content, "config": config}, kind, node)
                assert list(reply["arrays"].keys()) == list(content["arrays"].keys())
                norms[asked] = norm_of_update(reply["arrays"], content["arrays"])
            assert norms[True] <= clip * (1 + 1e-4), (kind, norms)
            assert norms[False] > 2 * clip, (kind, norms)   # the clipping did something
            if kind == "train.group":
                assert set(reply) >= {"routing"}             # the routing statistics still go


def _replies(stage: str, start: dict, updates: list[dict], examples: list[int]):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    out = []
    for i, (u, n) in enumerate(zip(updates, examples)):
        content = RecordDict({"arrays": ArrayRecord({k: start[k] + u[k] for k in start}),
                              "metrics": MetricRecord({"num-examples": n, "num-users": 1})})
        if stage == "group":  # uneven routing mass: without DP expert e would be weighted by it
            content["routing"] = ArrayRecord({"routing_mass": torch.tensor([[10.0 * i + 1, 1.0]]),
                                              "mixtures": torch.rand(1, 1, 2)})
        out.append(Message(content, dst_node_id=1, message_type=f"train.{stage}"))
    return out


@pytest.mark.parametrize("stage", ["population", "group"])
def test_server_side_dp_clips_averages_uniformly_and_noises_before_the_server_step(stage, server_identity):
    """Each reply's update is clipped to C against the round's start, the clipped updates are
    averaged with equal weights (not by examples or routing mass), and the server optimizer (here
    FedAvgM's learning rate 2) steps on that average."""
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies.chains import NodesView
    # in no sorted order: the average comes back in the order sent, whatever order DP works in
    keys = ("l.lora_B", "l.lora_A") if stage == "population" else ("l.router_h", "l.expert_A", "l.expert_B")
    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(2, 3, generator=g) for k in keys}
    direction = [{k: torch.randn(2, 3, generator=g) for k in keys} for _ in range(3)]
    scale = [0.3, 5.0, 2.0]   # update norms, relative to a unit direction: the last two are clipped
    updates = []
    for d, s in zip(direction, scale):
        n = math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
        updates.append({k: v * s / n for k, v in d.items()})
    cfg = load_config("tiny", ["privacy.dp.noise_multiplier=0", "privacy.dp.clip=1.0", "federation.server_lr=2"])
    strategy = stage_strategy(cfg, stage)
    list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord({"server-round": 1}), NodesView([4, 5, 6])))
    arrays, metrics = strategy.aggregate_train(1, _replies(stage, start, updates, [1, 3, 7]))
    got = arrays.to_torch_state_dict()
    assert list(got) == list(keys)
    for k in keys:
        clipped_mean = sum(u[k] * min(1.0, 1.0 / s) for u, s in zip(updates, scale)) / 3
        assert torch.allclose(got[k].double(), (start[k] + 2 * clipped_mean).double(), atol=1e-5), k
    assert metrics["num-examples"] == 11 and "dp-weight" not in metrics


def test_the_noise_has_std_z_clip_over_n_and_a_seed_repeats_it(server_identity):
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies.chains import NodesView
    start = {"l.expert_A": torch.zeros(2, 3000), "l.expert_B": torch.zeros(2, 5), "l.router_h": torch.zeros(2, 5)}

    def noised(seed: int) -> torch.Tensor:
        cfg = load_config("tiny", ["privacy.dp.noise_multiplier=4", "privacy.dp.clip=0.3", f"privacy.dp.seed={seed}"])
        strategy = stage_strategy(cfg, "group")
        list(strategy.configure_train(2, ArrayRecord(start), ConfigRecord({}), NodesView([1, 2, 3])))
        # a tiny, equal update (Flower's clipping divides by the update's norm: an exact zero fails)
        small = [{k: torch.full_like(v, 1e-7) for k, v in start.items()}] * 3
        arrays, _ = strategy.aggregate_train(2, _replies("group", start, small, [2, 2, 2]))
        return torch.cat([v.flatten() for v in arrays.to_torch_state_dict().values()]).double() - 1e-7

    noise = noised(7)
    assert float(noise.std()) == pytest.approx(4 * 0.3 / 3, rel=0.03)
    assert abs(float(noise.mean())) < 0.05
    assert torch.equal(noise, noised(7)) and not torch.equal(noise, noised(8))


@pytest.mark.slow
def test_noise_on_the_aggregate_of_a_tiny_federation_has_the_configured_std(tmp_path):
    """Two runs alike but for the noise multiplier (0 and 2): the population LoRA they end with
    differs by the noise alone, of std z * C / n with n = 4 clients."""
    base = ["simulation.engine=inprocess", "method=population", "eval.stages=[population]", "privacy.dp.clip=0.05",
            "privacy.dp.seed=11", f"output.dir={tmp_path}"]
    for name, z in (("z0", 0), ("z2", 2)):
        assert run_sim("tiny", [*base, f"output.name={name}", f"privacy.dp.noise_multiplier={z}"]) == 0
    _, quiet = Checkpoint(tmp_path / "z0").load()
    _, noisy = Checkpoint(tmp_path / "z2").load()
    diff = torch.cat([(noisy["population"][k].double() - v.double()).flatten() for k, v in quiet["population"].items()])
    assert diff.numel() > 5000
    assert float(diff.std()) == pytest.approx(2 * 0.05 / 4, rel=0.03)
    assert abs(float(diff.mean())) < 0.002
    record = [json.loads(line) for line in (tmp_path / "z2" / "rounds.jsonl").read_text().splitlines()]
    privacy = next(r for r in record if r["kind"] == "privacy")
    assert privacy["stages"]["population"]["rounds"] == 1 and privacy["delta"] == 0.25
    # the unclipped update norms are not released under DP (a run without DP records them)
    assert not any(k.startswith("update_norm") for r in record for k in r)
    table = (tmp_path / "z2" / "table.md").read_text()
    assert "composed epsilon" in table and "at delta 0.25" in table
    assert "clipping without noise" in (tmp_path / "z0" / "table.md").read_text()
    from sim.report_run import Run  # proper report's line for each run
    assert Run(tmp_path / "z2").privacy().startswith("DP: epsilon") and "composed inf" in Run(tmp_path / "z0").privacy()


# ---------------------------------------------------------------- accounting
def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight (epsilon, delta) of a Gaussian mechanism with sensitivity / std = mu (Balle and
    Wang, 2018): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu), solved by bisection."""
    def phi(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    def delta_of(eps):
        return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_accountant_epsilon_equals_the_gaussian_mechanisms_closed_form():
    from server.privacy import epsilon
    z, rounds, delta = 1.3, 7, 1e-3
    orders = tuple(float(a) for a in range(2, 257))
    # RDP of one Gaussian release at order a is a / (2 z^2) and adds up over releases; to (epsilon,
    # delta) as Canonne, Kamath and Steinke (2020) / Asoodeh et al. (2020): the minimum over orders of
    # rdp + log(1 - 1/a) - log(delta * a) / (a - 1)
    by_hand = min(rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders)
    assert epsilon([(z, rounds)], delta, orders) == pytest.approx(by_hand, rel=1e-9)
    # with the accountant's own orders: between the tight value and Mironov's classic conversion
    # (rho + 2 sqrt(rho log(1/delta)), rho = rounds / (2 z^2), minimised over every real order)
    eps = epsilon([(z, rounds)], delta)
    rho = rounds / (2 * z * z)
    assert _exact_gaussian_epsilon(math.sqrt(rounds) / z, delta) < eps < rho + 2 * math.sqrt(rho * math.log(1 / delta))
    # composition: stages add up; halving z (a user sharing its clipped update) costs four releases
    assert epsilon([(z, 3), (z, 4)], delta) == pytest.approx(eps, rel=1e-12)
    assert epsilon([(z / 2, 1)], delta) == pytest.approx(epsilon([(z, 4)], delta), rel=1e-12)
    assert epsilon([(0.0, 1)], delta) == math.inf and epsilon([], delta) == 0.0


def test_the_privacy_unit_and_delta_of_a_run():
    from server.privacy import epsilon, note_release, privacy_summary
    from server.state import Progress, SharedParts
    logged = []

    def fed(*overrides):
        return SimpleNamespace(cfg=load_config("tiny", [*DP, *overrides]), nodes=lambda: [11, 12, 13, 14],
                               round_samples={},
                               progress=Progress(participation={"eval:base": {"users": 8}}), parts=SharedParts(),
                               run_dir=SimpleNamespace(log=logged.append))

    alone, chained = fed(), fed("federation.chains=2")
    for f in (alone, chained):
        note_release(f, "population", 1, 4)
        note_release(f, "population", 1, 4)   # a redone round counts once
        note_release(f, "group", 1, 4)
    a, c = privacy_summary(alone), privacy_summary(chained)
    assert a["delta"] == c["delta"] == 1 / 8
    assert a["stages"]["population"]["rounds"] == 1
    assert a["stages"]["population"]["epsilon"] == pytest.approx(epsilon([(1.0, 1)], 1 / 8))
    assert a["epsilon"] == pytest.approx(epsilon([(1.0, 2)], 1 / 8))
    assert c["epsilon"] == pytest.approx(epsilon([(0.5, 2)], 1 / 8)) and c["epsilon"] > a["epsilon"]
    assert privacy_summary(SimpleNamespace(cfg=load_config("tiny"), progress=Progress(), parts=SharedParts())) == \
        {"dp": False}


# ---------------------------------------------------------------- DP off
@pytest.mark.slow
def test_dp_off_leaves_every_number_of_a_run_unchanged(tmp_path):
    """The privacy section at its defaults and one with every knob set but the noise multiplier
    (so DP stays off) end with the same parameters, bit for bit, and the same table."""
    base = ["simulation.engine=inprocess", "eval.stages=[population,user]", f"output.dir={tmp_path}"]
    assert run_sim("tiny", [*base, "output.name=absent"]) == 0
    assert run_sim("tiny", [*base, "output.name=knobs", "privacy.dp.clip=0.001", "privacy.dp.clipping=client",
                            "privacy.dp.seed=3", "privacy.dp.delta=0.01"]) == 0
    progress, ref = Checkpoint(tmp_path / "absent").load()
    _, got = Checkpoint(tmp_path / "knobs").load()
    assert set(ref) == set(got) and "privacy" not in progress
    for part in ("population", "group"):
        assert set(ref[part]) == set(got[part])
        for k, v in ref[part].items():
            assert torch.equal(v, got[part][k]), (part, k)
    assert torch.equal(ref["mixtures"], got["mixtures"])

    def rows(name):
        return json.loads((tmp_path / name / "table.json").read_text())
    assert rows("absent") == rows("knobs")
    for name in ("absent", "knobs"):
        assert "privacy: no formal DP" in (tmp_path / name / "table.md").read_text()
        lines = [json.loads(x) for x in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]
        assert {"dp": False}.items() <= next(r for r in lines if r["kind"] == "privacy").items()


@pytest.mark.slow
def test_a_private_run_killed_mid_stage_resumes_with_the_same_noise_and_account(tmp_path):
    """privacy.dp.seed seeds each round's noise by (seed, stage, round), and the releases the
    accountant counts are in the checkpoint: a resumed run ends where an uninterrupted one does."""
    opt = ["simulation.engine=inprocess", "method=population", "population.rounds=2", "eval.stages=[population]",
           *DP, "privacy.dp.seed=5", "federation.server_opt=fedadam", "federation.server_lr=0.01",
           f"output.dir={tmp_path}"]
    assert run_sim("tiny", [*opt, "output.name=whole"]) == 0
    assert run_sim("tiny", [*opt, "output.name=crash", "debug.crash_after=population:1"]) == 1
    assert run_sim(None, [], resume=str(tmp_path / "crash")) == 0
    done, got = Checkpoint(tmp_path / "crash").load()
    ref_done, ref = Checkpoint(tmp_path / "whole").load()
    for k, v in ref["population"].items():
        assert torch.equal(v, got["population"][k]), k
    assert done["privacy"] == ref_done["privacy"] and len(done["privacy"]["population"]) == 2
