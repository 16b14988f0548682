"""The federation on Flower's simulation engine, on the tiny model and synthetic users."""
import json
import re
from pathlib import Path

import pytest
import torch

from server.checkpoint import Checkpoint
from sim.run import run_sim

# server_lr != 1 makes the server fetch the seeded starting points (query.init) and take FedAvgM steps
TINY = ["federation.audit_replies=true", "federation.server_lr=1.5"]


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


def sim(tmp, name, *overrides, resume=None):
    if resume:
        return run_sim(None, [], resume=str(resume))
    return run_sim("tiny", [f"output.dir={tmp}", f"output.name={name}", *overrides])


@pytest.fixture(scope="module")
def four_users(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    assert sim(tmp, "run", *TINY) == 0
    return tmp / "run", None


@pytest.mark.slow
def test_all_three_stages_with_four_simulated_users(four_users):
    run, _ = four_users
    table = (run / "table.md").read_text()
    for title in ("bare backbone", "stage 1: population", "stage 2: group", "stage 3: user"):
        assert title in table
    # every user was trained in every stage (the one-node query.init steps do not count)
    assert "stage 1: population 4, stage 2: group 4, stage 3: user 4" in table
    rows = json.loads((run / "table.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "population", "group", "user"]
    assert all(r["users"] == 4 and r["nodes"] == "4/4" for r in rows)
    kinds = [(r["kind"], r["stage"]) for r in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())]
    assert ("train", "population") in kinds and ("train", "group") in kinds and ("train", "user") in kinds
    assert (run / "stages.png").stat().st_size > 1000 and (run / "mixtures.png").stat().st_size > 1000
    # the private state stayed on the clients' disks: one embedding and one user adapter per user
    state = run / "clients"
    assert len(list(state.glob("*/*.embedding.safetensors"))) == 4
    assert len(list(state.glob("*/*.user/adapter_model.safetensors"))) == 4
    # each user's mixture and dominant expert (group recovery) stay there too: no reply carries them
    assert len(list(state.glob("*/mixtures.csv"))) == 4


ALLOWED_ARRAYS = {"train.population": {"arrays"}, "train.group": {"arrays", "routing"}, "train.user": set(),
                  "evaluate": set(), "query.init": {"arrays"}, "query.mixtures": {"routing"},
                  "query.partition": set()}   # a Ray run's node says its simulated partition, nothing else
PART_KEYS = {"train.population": (".lora_A", ".lora_B"),
             "train.group": (".expert_A", ".expert_B", ".router_h", ".router_u")}
PART_KEYS["query.init"] = PART_KEYS["train.population"] + PART_KEYS["train.group"]
METRICS = {"num-examples", "num-users", "train_loss", "train_tokens", "train_seconds", "tokens_per_s",
           "constraint_loss", "num_users", "partition-id"}
SPLIT_METRIC = re.compile(r"^(test|val)\.(user-scores|stat\.[a-z_]+)$")


@pytest.mark.slow
def test_privacy_invariant_on_every_reply(four_users):
    run, _ = four_users
    replies = assert_replies_private(run)
    assert {r["message_type"] for r in replies} == {"train.population", "train.group", "train.user", "evaluate",
                                                     "query.init", "query.mixtures", "query.partition"}
    # 4 nodes x 7 steps, one node's two starting points, the 4 nodes' first pool of mixtures, and
    # each node's partition, asked once (the Ray engine's node ids are random: server/federation.py nodes)
    assert len(replies) == 4 * 7 + 2 + 4 + 4


def assert_replies_private(run: Path) -> list[dict]:
    """Every reply the clients of `run` sent (federation.audit_replies) holds only population or
    group parameters, routing statistics and metrics; returns the replies."""
    replies = [json.loads(line) for f in (run / "wire").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert replies
    questions = json.loads((Path(run) / "synthetic_data" / "questions.json").read_text())
    user_ids = [q["user_id"] for q in questions]
    texts = [p["description"] for q in questions for p in q["profile"]] + [q["input"] for q in questions]
    for r in replies:
        mt = r["message_type"]
        assert set(r["arrays"]) <= ALLOWED_ARRAYS[mt], (mt, set(r["arrays"]))
        for key in r["arrays"].get("arrays", {}):
            assert key.endswith(PART_KEYS[mt]), key  # only population / group parameters
        if mt in ("train.group", "query.mixtures"):
            routing = r["arrays"]["routing"]
            assert set(routing) == ({"routing_mass", "mixtures"} if mt == "train.group" else {"mixtures"})
            assert routing["mixtures"]["shape"][0] == 1  # one anonymous mixture per user held
        for name, rec in r["metrics"].items():
            assert name == "metrics"
            assert {k for k in rec if not SPLIT_METRIC.match(k)} <= METRICS, set(rec)
        assert r["configs"] in ({}, {"info": {"task": "LaMP_2"}})
        blob = json.dumps(r)
        for uid in user_ids:
            assert uid not in blob
        for forbidden in ("user_A", "user_B", "router_g", "e_u", "embedding"):
            assert forbidden not in blob
        assert not any(t[:40] in blob for t in texts)
    return replies


@pytest.mark.slow
def test_federation_of_one_client_equals_proper_local(tmp_path, four_users):
    """The centralized reference runs the same code: one client holding every user."""
    from shared.runtime.config import load_config
    from sim.local import run_local
    assert sim(tmp_path, "one", "federation.users_per_client=4") == 0
    cfg = load_config("tiny", [f"data.path={tmp_path / 'one' / 'synthetic_data'}"])
    rows_local = run_local(cfg, tmp_path / "local")
    _, parts = Checkpoint(tmp_path / "one").load()
    from safetensors.torch import load_file
    local_group = load_file(str(tmp_path / "local" / "group.safetensors"))
    assert set(local_group) == set(parts["group"])
    for k, v in local_group.items():
        assert torch.allclose(v, parts["group"][k], atol=1e-6), k
    rows_fed = json.loads((tmp_path / "one" / "table.json").read_text())
    assert [r["metrics"] for r in rows_fed] == [r["metrics"] for r in rows_local]
    # a server learning rate scales the averaged move: B_p starts at 0, so B_p is the one client's x 2
    assert sim(tmp_path, "lr2", "federation.users_per_client=4", "federation.server_lr=2", "method=population") == 0
    _, lr2 = Checkpoint(tmp_path / "lr2").load()
    b_keys = [k for k in lr2["population"] if k.endswith(".lora_B")]
    assert b_keys and float(lr2["population"][b_keys[0]].abs().sum()) > 0
    for k in b_keys:
        assert torch.allclose(lr2["population"][k], 2 * parts["population"][k], atol=1e-6), k


def test_a_stage_server_setting_overrides_the_federation_one():
    from server.strategies import server_settings
    from shared.runtime.config import load_config
    cfg = load_config("tiny", ["federation.server_lr=3", "group.server_lr=5", "group.server_opt=fedadam"])
    assert server_settings(cfg, "population")["server_lr"] == 3.0
    assert (server_settings(cfg, "group")["server_lr"], server_settings(cfg, "group")["server_opt"]) == (5.0, "fedadam")
    assert stage_strategy(cfg, "population").server_learning_rate == 3.0
    assert stage_strategy(cfg, "group").eta == 5.0
    assert server_settings(load_config("tiny"), "group")["server_lr"] == 1.0


@pytest.mark.slow
def test_inprocess_engine_lands_on_the_parameters_of_the_ray_run(tmp_path, four_users):
    """simulation.engine=inprocess (sim/inprocess.py, for sweeps) runs the same ServerApp and ClientApp
    without Ray; only the number of torch threads differs, hence a tolerance, not equality."""
    run, _ = four_users
    assert sim(tmp_path, "ip", *TINY, "simulation.engine=inprocess") == 0
    _, ours = Checkpoint(tmp_path / "ip").load()
    _, ref = Checkpoint(run).load()
    for part in ("population", "group"):
        assert set(ours[part]) == set(ref[part])
        for k, v in ref[part].items():
            assert torch.allclose(v, ours[part][k], atol=1e-5), (part, k)
    assert json.loads((tmp_path / "ip" / "table.json").read_text())[-1]["metrics"] == \
        json.loads((run / "table.json").read_text())[-1]["metrics"]


@pytest.mark.slow
def test_chains_on_the_ray_engine_visit_the_clients_the_inprocess_engine_does(tmp_path):
    """Flower's Ray engine gives random node ids each run; chains cut from nodes ordered by id put
    other clients together every run (three runs of the main job's population stage: val 16.0-29.9 %).
    Ordered by partition (server/federation.py nodes), a chained Ray run lands where the in-process
    engine, whose ids are fixed, does: 6 clients in 2 chains of 3, sequential inside a chain, so
    another cut or order gives other parameters."""
    short = ["data.synthetic.n_users=6", "data.holdout=1", "federation.chains=2", "method=population",
             "eval.stages=[population]", "eval.splits=[val]"]
    assert sim(tmp_path, "ray", *short) == 0
    assert sim(tmp_path, "ip", *short, "simulation.engine=inprocess") == 0
    ray, ip = Checkpoint(tmp_path / "ray").load()[1], Checkpoint(tmp_path / "ip").load()[1]
    for k, v in ip["population"].items():
        assert torch.allclose(v, ray["population"][k], atol=1e-5), k


@pytest.mark.slow
def test_failed_and_slow_clients_do_not_stop_the_run(tmp_path):
    """The stalled client answers only once the server has gone on without it (client/runtime.py
    inject_faults), so it is silent in population:1 however fast the machine is."""
    rc = sim(tmp_path, "faults", "debug.fail_partitions=[1]", "debug.fail_stages=[group]",
             "debug.slow_partitions=[2]", "debug.slow_stages=[population]", "debug.slow_seconds=900",
             "federation.timeout_s=40")
    assert rc == 0
    progress, _ = Checkpoint(tmp_path / "faults").load()
    p = progress["participation"]
    assert p["population:1"]["silent"] == 1 and p["population:1"]["users"] == 3
    assert p["group:1"]["failed"] == 1 and p["group:1"]["users"] == 3
    table = (tmp_path / "faults" / "table.md").read_text()
    assert "population:1: 0 failed, 1 silent" in table and "group:1: 1 failed, 0 silent" in table
    assert "stage 1: population 3" in table and "stage 2: group 3" in table


@pytest.mark.slow
def test_killed_run_resumes_and_ends_with_the_same_results(tmp_path, four_users):
    run, _ = four_users
    assert sim(tmp_path, "crash", *TINY, "debug.crash_after=group:1") == 1
    progress, _ = Checkpoint(tmp_path / "crash").load()
    assert progress["done"][-1] == "group:1" and not (tmp_path / "crash" / "table.md").exists()
    assert sim(tmp_path, None, resume=tmp_path / "crash") == 0
    done, parts = Checkpoint(tmp_path / "crash").load()
    ref_done, ref = Checkpoint(run).load()
    assert done["done"] == ref_done["done"]
    for part in ("population", "group"):
        for k, v in ref[part].items():
            assert torch.allclose(v, parts[part][k], atol=1e-6), (part, k)
    assert done["evals"] == ref_done["evals"]


@pytest.mark.slow
def test_one_chain_is_the_sequential_schedule(tmp_path):
    """federation.chains=1: each node trains what the node before it returned, so the round's
    result is one chain of the four real clients' training, in some order (not an average)."""
    import itertools

    from client.runtime import users_of_partition
    from client.trainer import ClientTrainer, load_users
    from shared.runtime.config import load_config
    assert sim(tmp_path, "seq", "federation.chains=1", "federation.audit_replies=true") == 0
    run = tmp_path / "seq"
    table = (run / "table.md").read_text()
    assert "stage 1: population 4, stage 2: group 4, stage 3: user 4" in table
    progress, parts = Checkpoint(run).load()
    assert progress["participation"]["population:1"] == {"sent": 4, "ok": 4, "failed": 0, "silent": 0, "users": 4}
    replies = assert_replies_private(run)
    assert {r["message_type"] for r in replies} == {"train.population", "train.group", "train.user", "evaluate",
                                                     "query.mixtures", "query.partition"}

    cfg = load_config("tiny", [f"data.path={run / 'synthetic_data'}"])
    spec, users = load_users(cfg)
    clients = [ClientTrainer(cfg, spec, users_of_partition(users, i, 4, 1), str(tmp_path / f"c{i}"), client_seed=i)
               for i in range(4)]

    def chain(order):
        state = None
        for i in order:
            state = clients[i].population(state, 1).shared
        return state

    def same(a, b):
        return all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)

    matches = [order for order in itertools.permutations(range(4)) if same(chain(order), parts["population"])]
    assert len(matches) == 1, matches
    # and it is not what the parallel schedule would have made of the same clients
    from shared.method.aggregate import weighted_average
    results = [c.population(None, 1) for c in clients]
    fedavg = weighted_average([r.shared for r in results], [r.num_examples for r in results])
    assert not same(fedavg, parts["population"])


@pytest.mark.slow
def test_as_many_chains_as_clients_is_the_parallel_schedule(tmp_path):
    """chains = number of clients runs exactly FedAvg's round (every parameter equal), two chains
    of two do something else."""
    ip = ["simulation.engine=inprocess", "population.rounds=2"]
    for name, chains in (("par", "null"), ("c4", "4"), ("c2", "2")):
        assert sim(tmp_path, name, *ip, f"federation.chains={chains}") == 0
    _, par = Checkpoint(tmp_path / "par").load()
    _, c4 = Checkpoint(tmp_path / "c4").load()
    _, c2 = Checkpoint(tmp_path / "c2").load()
    for part in ("population", "group"):
        for k, v in par[part].items():
            assert torch.equal(v, c4[part][k]), (part, k)
    assert any(not torch.allclose(v, c2["population"][k]) for k, v in par["population"].items())


def test_nodes_are_ordered_by_partition_so_random_node_ids_sample_the_same_clients():
    """Flower's Ray engine gives new random node ids each run; ordered by the in-process engine's id of
    their partition, two such runs (and the in-process engine) sample and chain the same clients."""
    import random as rnd

    from server.federation import ordered_by_partition
    from server.strategies.chains import sampled_nodes, split_chains
    from shared.runtime.config import load_config
    from shared.runtime.virtual import client_ids
    cfg = load_config("tiny", ["federation.chains=2"])
    inprocess = sorted(client_ids(6))
    picked = [client_ids(6).index(n) for n in sampled_nodes(inprocess, cfg, "population", 1)]   # partitions
    for run in range(3):
        ids = rnd.Random(run).sample(range(1, 2 ** 62), 6)      # partition p -> ids[p], as a Ray run
        order = ordered_by_partition(ids, {n: p for p, n in enumerate(ids)})
        chains = split_chains(sampled_nodes(order, cfg, "population", 1), 2)
        assert [[ids.index(n) for n in c] for c in chains] == split_chains(picked, 2)
    # a node that did not say its partition goes last, by id
    assert ordered_by_partition([5, 9, 7], {9: 0}) == [9, 5, 7]


def test_sampling_and_chains_are_seeded_and_bad_config_values_are_refused():
    from server.strategies.chains import sampled_nodes, split_chains
    from shared.runtime.config import ConfigError, load_config
    cfg = load_config("tiny")
    nodes = [907, 12, 55, 3001, 8]
    first = sampled_nodes(nodes, cfg, "population", 1)
    assert sorted(first) == sorted(nodes)
    assert sampled_nodes(list(nodes), cfg, "population", 1) == first  # the same listing, the same draw
    assert sampled_nodes(nodes, cfg, "population", 2) != first or sampled_nodes(nodes, cfg, "population", 3) != first
    assert len(sampled_nodes(nodes, load_config("tiny", ["federation.fraction_train=0.5"]), "group", 1)) == 3
    two = load_config("tiny", ["federation.clients_per_round=2"])
    assert len(sampled_nodes(nodes, two, "group", 1)) == 2
    assert sampled_nodes(nodes, two, "group", 1) == sampled_nodes(nodes, cfg, "group", 1)[:2]
    assert split_chains([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_chains([1, 2, 3], None) == [[1], [2], [3]] and split_chains([1, 2], 9) == [[1], [2]]
    with pytest.raises(ConfigError, match="federation.schedule"):
        load_config("tiny", ["federation.schedule=sequential"])
    with pytest.raises(ValueError, match="train.bf16"):
        load_config("tiny", ["train.bf16=fast"])


def _reply(state: dict, n: int, routing: dict | None = None):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})
    if routing is not None:
        content["routing"] = ArrayRecord(routing)
    return Message(content, dst_node_id=1, message_type="train.population")


def test_replies_are_aggregated_in_an_order_fixed_by_their_content(task_identity):
    """FedAvg over replies that arrive in another order must give bit-identical parameters."""
    from server.federation import content_order
    from shared.runtime.config import load_config
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(64, generator=g) * 10 ** i} for i in range(-3, 4)]

    def aggregate(order):
        msgs = [_reply(states[i], 3 + i) for i in order]
        strategy = stage_strategy(load_config("tiny"), "population")
        arrays, _ = strategy.aggregate_train(1, sorted(msgs, key=content_order))
        return arrays.to_torch_state_dict()["w"]

    assert content_order(_reply(states[0], 3)) == content_order(_reply(states[0], 3))
    assert content_order(_reply(states[0], 3)) != content_order(_reply(states[1], 3))
    forward = list(range(len(states)))
    assert torch.equal(aggregate(forward), aggregate(forward[::-1]))


def _hand_step(opt: str, start, averages, lr=0.5, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al.'s server updates (and FedAvgM's), written out for a list of rounds' averages."""
    x, m, v, mom = start.double(), 0.0, None, None
    for t, avg in enumerate(averages, 1):
        delta = avg.double() - x
        if opt == "fedavgm":
            mom = -delta if mom is None else momentum * mom - delta
            x = x - lr * mom
            continue
        m = b1 * m + (1 - b1) * delta
        if opt == "fedadam":
            v = (1 - b2) * delta ** 2 if v is None else b2 * v + (1 - b2) * delta ** 2
        else:  # fedyogi
            v = (1 - b2) * delta ** 2 if v is None else v - (1 - b2) * delta ** 2 * torch.sign(v - delta ** 2)
        # Flower's FedAdam corrects the bias (with exponent t + 1), its FedYogi does not (as the paper)
        eta = lr * (1 - b2 ** (t + 1)) ** 0.5 / (1 - b1 ** (t + 1)) if opt == "fedadam" else lr
        x = x + eta * m / (v.sqrt() + tau)
    return x


@pytest.mark.parametrize("opt", ["fedavgm", "fedadam", "fedyogi"])
@pytest.mark.parametrize("stage", ["population", "group"])
def test_each_server_optimizer_step_equals_the_hand_computed_one(opt, stage, task_identity):
    """Two rounds on a toy update. Population: the examples-weighted average; group: experts by
    routing mass, routers by examples; then the server optimizer's step on that average."""
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies import load_state, state_tensors
    from server.strategies.chains import NodesView
    from shared.runtime.config import load_config
    cfg = load_config("tiny", [f"federation.server_opt={opt}", "federation.server_lr=0.5",
                               "federation.server_momentum=0.9"])
    g = torch.Generator().manual_seed(1)
    experts = ("l.expert_A", "l.expert_B") if stage == "group" else ()
    keys = ("l.lora_A", "l.lora_B") if stage == "population" else experts + ("l.router_h",)
    x = {k: torch.randn(2, 3, generator=g) for k in keys}   # group: row e = expert e (k = 2)
    start = dict(x)
    strategy = stage_strategy(cfg, stage)
    averages = []
    for rnd in (1, 2):
        if rnd == 2:  # the state survives a checkpoint: a new strategy with the saved state continues
            saved = state_tensors(strategy)
            assert saved
            strategy = stage_strategy(cfg, stage)
            load_state(strategy, saved)
        list(strategy.configure_train(rnd, ArrayRecord(x), ConfigRecord(), NodesView([5, 6])))
        states = [{k: v + torch.randn(v.shape, generator=g) for k, v in x.items()} for _ in range(2)]
        masses = [torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
        routing = [{"routing_mass": m, "mixtures": torch.rand(1, 1, 2, generator=g)} for m in masses]
        replies = [_reply(s, n, r if stage == "group" else None) for s, n, r in zip(states, (1, 3), routing)]
        avg = {k: (states[0][k] * 1 + states[1][k] * 3) / 4 for k in x}
        for k in experts:  # expert e by routing mass: clients weigh 3:1 for e = 0, 1:0 for e = 1
            avg[k] = torch.stack([(3 * states[0][k][0] + states[1][k][0]) / 4, states[0][k][1]])
        averages.append(avg)
        arrays, _ = strategy.aggregate_train(rnd, replies)
        new = arrays.to_torch_state_dict()
        for k in x:
            want = _hand_step(opt, start[k], [a[k] for a in averages])
            assert torch.allclose(new[k].double(), want, atol=1e-6), (opt, stage, rnd, k)
        x = {k: v.float() for k, v in new.items()}


@pytest.mark.slow
@pytest.mark.parametrize("server_opt, state", [
    (["federation.server_opt=fedadam", "federation.server_lr=0.01"], {"m_t", "v_t"}),
    # FedAvgM's momentum is a list in the order of the arrays: the checkpoint must keep that order
    (["federation.server_opt=fedavgm", "federation.server_lr=1.5", "federation.server_momentum=0.9"],
     {"momentum_vector"})])
def test_a_run_killed_mid_stage_resumes_with_the_server_optimizer_state(tmp_path, server_opt, state):
    """The server optimizer's state after population round 1 goes into the checkpoint: killed there
    and resumed, the run ends with the parameters of the run that was never stopped."""
    opt = ["simulation.engine=inprocess", *server_opt, "population.rounds=2", "group.rounds=2",
           "eval.stages=[user]"]
    assert sim(tmp_path, "whole", *opt) == 0
    assert sim(tmp_path, "crash", *opt, "debug.crash_after=population:1") == 1
    _, mid = Checkpoint(tmp_path / "crash").load()
    assert {k.partition("/")[0] for k in mid["opt.population"]} == state
    assert sim(tmp_path, None, resume=tmp_path / "crash") == 0
    _, ref = Checkpoint(tmp_path / "whole").load()
    _, got = Checkpoint(tmp_path / "crash").load()
    for part in ("population", "group", "opt.population", "opt.group"):
        assert set(ref[part]) == set(got[part])
        for k, v in ref[part].items():
            assert torch.equal(v, got[part][k]), (part, k)


@pytest.mark.slow
def test_the_constraint_loss_acts_in_the_first_group_round(four_users):
    """group.initial_pool: before group round 1 the clients send their users' starting mixtures,
    so one-user clients (no in-batch pair) have others to push from in round 1 too."""
    run, _ = four_users
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    first = next(r for r in rounds if r["kind"] == "train" and r["stage"] == "group" and r["round"] == 1)
    assert first["constraint_loss"] > 0.1
    progress, _ = Checkpoint(run).load()
    assert progress["participation"]["group:1/pool"]["ok"] == 4
