"""The federation on Flower's simulation engine, on the tiny model and synthetic users."""
import json
import re
import time
from pathlib import Path

import pytest
import torch

from server.checkpoint import Checkpoint
from sim.run import run_sim

# server_lr != 1 makes the server fetch the seeded starting points (query.init) and take FedAvgM steps
TINY = ["federation.audit_replies=true", "federation.server_lr=1.5"]


def sim(tmp, name, *overrides, resume=None):
    if resume:
        return run_sim(None, [], resume=str(resume))
    return run_sim("tiny", [f"output.dir={tmp}", f"output.name={name}", *overrides])


@pytest.fixture(scope="module")
def four_users(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    t0 = time.time()
    assert sim(tmp, "run", *TINY) == 0
    return tmp / "run", time.time() - t0


def test_all_three_stages_with_four_simulated_users(four_users):
    run, seconds = four_users
    assert seconds < 120, f"4-user federation took {seconds:.0f} s"
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


ALLOWED_ARRAYS = {"train": {"arrays"}, "train.group": {"arrays", "routing"}, "train.user": set(), "evaluate": set(),
                  "query.init": {"arrays"}}
PART_KEYS = {"train": (".lora_A", ".lora_B"),
             "train.group": (".expert_A", ".expert_B", ".router_h", ".router_u")}
PART_KEYS["query.init"] = PART_KEYS["train"] + PART_KEYS["train.group"]
METRICS = {"num-examples", "num-users", "train_loss", "train_tokens", "train_seconds", "tokens_per_s",
           "constraint_loss", "num_users"}
SPLIT_METRIC = re.compile(r"^(test|val)\.(user-scores|stat\.[a-z_]+)$")


def test_privacy_invariant_on_every_reply(four_users):
    run, _ = four_users
    replies = assert_replies_private(run)
    assert {r["message_type"] for r in replies} == {"train", "train.group", "train.user", "evaluate", "query.init"}
    assert len(replies) == 4 * 7 + 2  # 4 nodes x 7 steps, and one node's two starting points


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
        if mt == "train.group":
            routing = r["arrays"]["routing"]
            assert set(routing) == {"routing_mass", "mixtures"}
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


def test_a_stage_server_lr_overrides_the_federation_one():
    from server.strategy import population_strategy, server_lr
    from shared.runtime.config import load_config
    cfg = load_config("tiny", ["federation.server_lr=3", "group.server_lr=5"])
    assert (server_lr(cfg, "population"), server_lr(cfg, "group")) == (3.0, 5.0)
    assert population_strategy(cfg).server_learning_rate == 3.0
    assert server_lr(load_config("tiny"), "group") == 1.0


def test_server_lr_sweep_stands_for_the_federated_run(tmp_path, four_users):
    """bench/server_lr_sweep.py runs a round's clients in one process and takes the server step
    itself; at the run's server lr it must land on the parameters the Flower run ended with."""
    from bench.server_lr_sweep import main as sweep
    from shared.runtime.persist import load_tensors
    from server.strategy import server_step
    run, _ = four_users
    assert sweep(["-c", "tiny", "--out", str(tmp_path), "--population-lr", "1.5", "--group-lr", "1.5",
                  f"data.path={run / 'synthetic_data'}"]) == 0
    _, parts = Checkpoint(run).load()
    for part, cache in (("population", "init-population1"), ("group", "init_p1.5-group1")):
        t, _ = load_tensors(tmp_path / f"{cache}.safetensors")
        start = {k[6:]: v for k, v in t.items() if k.startswith("start.")}
        avg = {k[4:]: v for k, v in t.items() if k.startswith("avg.")}
        ours = server_step(start, avg, 1.5)
        assert set(ours) == set(parts[part])
        assert any(float(v.abs().sum()) > 0 for v in ours.values())
        for k, v in ours.items():
            assert torch.allclose(v, parts[part][k], atol=1e-5), (part, k)


def test_failed_and_slow_clients_do_not_stop_the_run(tmp_path):
    rc = sim(tmp_path, "faults", "debug.fail_partitions=[1]", "debug.fail_stages=[group]",
             "debug.slow_partitions=[2]", "debug.slow_stages=[population]", "debug.slow_seconds=80",
             "federation.timeout_s=40")
    assert rc == 0
    progress, _ = Checkpoint(tmp_path / "faults").load()
    p = progress["participation"]
    assert p["population:1"]["silent"] == 1 and p["population:1"]["users"] == 3
    assert p["group:1"]["failed"] == 1 and p["group:1"]["users"] == 3
    table = (tmp_path / "faults" / "table.md").read_text()
    assert "population:1: 0 failed, 1 silent" in table and "group:1: 1 failed, 0 silent" in table
    assert "stage 1: population 3" in table and "stage 2: group 3" in table


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


def test_sequential_schedule_chains_the_clients(tmp_path):
    """federation.schedule=sequential: each node trains what the node before it returned, so the
    round's result is one chain of the four real clients' training, in some order (not an average)."""
    import itertools
    from client.client_app import users_of_partition
    from client.trainer import ClientTrainer, load_users
    from shared.runtime.config import load_config
    assert sim(tmp_path, "seq", "federation.schedule=sequential", "federation.audit_replies=true") == 0
    run = tmp_path / "seq"
    table = (run / "table.md").read_text()
    assert "stage 1: population 4, stage 2: group 4, stage 3: user 4" in table
    progress, parts = Checkpoint(run).load()
    assert progress["participation"]["population:1"] == {"sent": 4, "ok": 4, "failed": 0, "silent": 0, "users": 4}
    replies = assert_replies_private(run)
    assert {r["message_type"] for r in replies} == {"train", "train.group", "train.user", "evaluate"}

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


def test_visit_order_is_seeded_per_round_and_bad_config_values_are_refused():
    from server.strategy import schedule, visit_order
    from shared.runtime.config import load_config
    nodes = [907, 12, 55, 3001, 8]
    first = visit_order(nodes, 0, "population", 1)
    assert sorted(first) == sorted(nodes)
    assert visit_order(list(reversed(nodes)), 0, "population", 1) == first  # the order nodes are listed in does not matter
    assert visit_order(nodes, 0, "population", 2) != first or visit_order(nodes, 0, "population", 3) != first
    assert len(visit_order(nodes, 0, "group", 1, fraction=0.5)) == 3
    assert schedule(load_config("tiny")) == "parallel"
    with pytest.raises(ValueError, match="federation.schedule"):
        load_config("tiny", ["federation.schedule=cyclic"])
    with pytest.raises(ValueError, match="train.bf16"):
        load_config("tiny", ["train.bf16=fast"])


def test_replies_are_aggregated_in_an_order_fixed_by_their_content():
    """FedAvg over replies that arrive in another order must give bit-identical parameters."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from server.server_app import content_order
    from server.strategy import population_strategy
    from shared.runtime.config import load_config
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(64, generator=g) * 10 ** i} for i in range(-3, 4)]

    def reply(state, n):
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}),
                       dst_node_id=1, message_type="train")

    def aggregate(order):
        msgs = [reply(states[i], 3 + i) for i in order]
        arrays, _ = population_strategy(load_config("tiny")).aggregate_train(1, sorted(msgs, key=content_order))
        return arrays.to_torch_state_dict()["w"]

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    # a Message outside a run needs these, which a ServerApp has
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        assert content_order(reply(states[0], 3)) == content_order(reply(states[0], 3))
        assert content_order(reply(states[0], 3)) != content_order(reply(states[1], 3))
        forward = list(range(len(states)))
        assert torch.equal(aggregate(forward), aggregate(forward[::-1]))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
