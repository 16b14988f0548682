"""Virtual clients (simulation.virtual_clients): M SuperNodes serve N one-user clients, and the run is
the run of N one-user SuperNodes: same sampled users, same parameters, same evaluation, same
replies on the wire, same private state."""
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from server.checkpoint import Checkpoint
from sim.run import run_sim

SMALL = ["simulation.engine=inprocess", "data.synthetic.n_users=6", "data.holdout=1", "eval.splits=[test,val]",
         "eval.mode=score", "federation.clients_per_round=3", "federation.audit_replies=true",
         "federation.server_lr=1.5"]


def sim(tmp, name, *overrides):
    return run_sim("tiny", [f"output.dir={tmp}", f"output.name={name}", *SMALL, *overrides])


def audit(run: Path) -> list[str]:
    """The replies the audit saw (federation.audit_replies), with wall-clock metrics blanked."""
    out = []
    for f in (run / "wire").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            entry = json.loads(line)
            for rec in entry.get("metrics", {}).values():
                rec.update({k: None for k in rec if k in ("train_seconds", "tokens_per_s")})
            out.append(json.dumps(entry, sort_keys=True))
    return sorted(out)


def evals(progress: dict) -> dict:
    """Per stage and split: summed statistics and the users' scores (their order is shuffled on purpose)."""
    return {stage: {split: (v["stats"], sorted(v["user_scores"])) for split, v in by.items()}
            for stage, by in progress["evals"].items()}


BATCHED: list[tuple[str, int]] = []   # (stage, users) of each prediction pass of the virtual run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from client.trainer import ClientTrainer
    tmp = tmp_path_factory.mktemp("virtual")
    assert sim(tmp, "one-per-user") == 0
    predictions = ClientTrainer.predictions

    def counted(self, stage, *args, **kw):
        BATCHED.append((stage, len(self.users)))
        return predictions(self, stage, *args, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClientTrainer, "predictions", counted)
        assert sim(tmp, "virtual", "simulation.virtual_clients=2") == 0
    return tmp / "one-per-user", tmp / "virtual"


def test_a_virtual_client_run_equals_the_one_supernode_per_user_run(runs):
    ref, virt = runs
    (p_ref, parts_ref), (p_virt, parts_virt) = Checkpoint(ref).load(), Checkpoint(virt).load()
    for part in ("population", "group"):
        assert set(parts_ref[part]) == set(parts_virt[part])
        for k, v in parts_ref[part].items():
            assert torch.equal(v, parts_virt[part][k]), (part, k)
    assert torch.equal(parts_ref["mixtures"], parts_virt["mixtures"])
    assert p_ref["participation"] == p_virt["participation"]
    assert p_ref["participation"]["population:1"]["sent"] == 3    # sampled, out of 6
    assert evals(p_ref) == evals(p_virt)
    assert any(s > 0 for _, scores in evals(p_ref)["user"].values() for s in scores)  # not all zero
    # evaluated in shared batches: 2 SuperNodes x 2 splits per stage, each pass over 3 clients' users
    assert sorted(BATCHED) == sorted((s, 3) for s in ("base", "population", "group", "user") for _ in range(4))
    assert json.loads((ref / "table.json").read_text()) == json.loads((virt / "table.json").read_text())
    # the same replies left the same clients (the audit names each reply's client by its node id)
    assert audit(ref) == audit(virt) and len(audit(ref)) > 6
    # and each user's private state is in its own client's directory, the same tensors
    from safetensors.torch import load_file
    files = sorted(p.relative_to(ref) for p in (ref / "clients").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(virt) for p in (virt / "clients").rglob("*.safetensors"))
    assert len({f.parts[1] for f in files}) == 6
    for f in files:
        a, b = load_file(str(ref / f)), load_file(str(virt / f))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f


def test_a_chained_round_of_virtual_clients_equals_one_supernode_per_user(tmp_path):
    """federation.chains=1: each client gets what the one before it returned (its own content, packed
    per client in a bundle)."""
    short = ["federation.chains=1", "method=population", "eval.stages=[population]"]
    assert sim(tmp_path, "ref", *short) == 0
    assert sim(tmp_path, "virt", *short, "simulation.virtual_clients=2") == 0
    ref, virt = Checkpoint(tmp_path / "ref").load()[1], Checkpoint(tmp_path / "virt").load()[1]
    assert all(torch.equal(v, virt["population"][k]) for k, v in ref["population"].items())


def test_a_failing_virtual_client_fails_alone(tmp_path):
    assert sim(tmp_path, "faults", "simulation.virtual_clients=2", "debug.fail_partitions=[4]",
               "debug.fail_stages=[eval]") == 0
    progress, _ = Checkpoint(tmp_path / "faults").load()
    assert progress["participation"]["eval:base"] == {"sent": 6, "ok": 5, "failed": 1, "silent": 0, "users": 5}


class FakeGrid:
    """Two SuperNodes that answer a bundle by the mod's rules, counting the bundles they got."""

    def __init__(self):
        from client.virtual import virtual_clients_mod
        self.mod, self.got, self.replies = virtual_clients_mod, [], []

    def get_node_ids(self):
        return [11, 22]

    def push_messages(self, msgs):
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"bundle-{len(self.got)}-{i}"
            self.got.append(m)

            def handler(msg, ctx):
                if int(ctx.node_config["partition-id"]) == 3:
                    raise RuntimeError("boom")
                value = int(msg.content["config"]["x"])
                return Message(RecordDict({"metrics": ConfigRecord({"who": int(ctx.node_config["partition-id"]),
                                                                     "x": value})}), reply_to=msg)
            self.replies.append(self.mod(m, _Ctx(), handler))
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, ids):
        out = [r for r in self.replies if r.metadata.reply_to_message_id in set(ids)]
        self.replies = [r for r in self.replies if r not in out]
        return out


class _Ctx:
    run_id, node_id, node_config, run_config = 1, 11, {"partition-id": 0, "num-partitions": 2}, {}


def test_the_grid_carries_each_virtual_clients_own_message_and_reply(task_identity):
    from server.virtual_grid import VirtualGrid
    from shared.runtime.virtual import client_ids
    inner = FakeGrid()
    grid = VirtualGrid(inner, num_clients=5, supernodes=2, per_message=64)
    ids = client_ids(5)
    assert sorted(grid.get_node_ids()) == sorted(ids)
    # each client its own content (a chained round): packed per client in two bundles, one per SuperNode
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 10 + i})}), dst_node_id=ids[i], message_type="train.x")
            for i in range(5)]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=5)}
    assert len(inner.got) == 2 and {m.metadata.dst_node_id for m in inner.got} == {11, 22}
    assert set(replies) == set(ids)
    for i in range(5):
        r = replies[ids[i]]
        assert r.metadata.reply_to_message_id == msgs[i].metadata.message_id
        if i == 3:
            assert r.has_error() and "boom" in r.error.reason
        else:
            assert dict(r.content["metrics"]) == {"who": i, "x": 10 + i}
    # a message to an unknown client fails without reaching a SuperNode
    bad = grid.send_and_receive([Message(RecordDict(), dst_node_id=12345, message_type="train.x")], timeout=5)
    assert bad[0].has_error() and len(inner.got) == 2


def test_virtual_clients_are_refused_without_the_client_count():
    from server.virtual_grid import virtual_grid
    from shared.runtime.config import ConfigError, load_config
    cfg = load_config("tiny", ["simulation.virtual_clients=2"])
    with pytest.raises(RuntimeError, match="num_clients"):
        virtual_grid(object(), cfg)
    assert virtual_grid("grid", load_config("tiny")) == "grid"
    with pytest.raises(ConfigError):
        load_config("tiny", ["simulation.virtual_clients=0"])


def test_more_supernodes_asked_for_than_clients_waits_for_the_ones_started():
    """simulation.virtual_clients = 4 with 2 clients: sim/run.py starts 2 SuperNodes, and the grid
    must wait for those 2 (it waited for 4, then timed out)."""
    from server.virtual_grid import virtual_grid
    from shared.runtime.config import load_config
    cfg = load_config("tiny", ["simulation.virtual_clients=4", "simulation.num_clients=2"])
    assert virtual_grid(object(), cfg).supernodes == 2
    cfg = load_config("tiny", ["simulation.virtual_clients=2", "simulation.num_clients=5"])
    assert virtual_grid(object(), cfg).supernodes == 2


def test_eval_clients_evaluates_and_trains_stage_3_on_one_fixed_sample(tmp_path):
    """eval.clients = 2 of 6 (issue 34's study at scale): every evaluation and the user stage go to the
    same 2 clients, drawn by eval.sample_seed, so a run with another seed meets the same users; the
    shared stages still sample from all 6; the table says so and counts passes against all 6 users."""
    short = ["simulation.virtual_clients=2", "eval.clients=2", "federation.audit_replies=false"]
    assert sim(tmp_path, "a", *short) == 0
    assert sim(tmp_path, "b", *short, "seed=1") == 0
    assert sim(tmp_path, "c", *short, "eval.sample_seed=5") == 0
    sampled = {}
    for name in ("a", "b", "c"):
        progress = json.loads((tmp_path / name / "checkpoint" / "progress.json").read_text())
        part = progress["participation"]
        for step in ("eval:base", "eval:population", "eval:group", "eval:user", "user"):
            assert part[step]["sent"] == 2 and part[step]["users"] == 2, (name, step, part[step])
        assert part["population:1"]["sent"] == 3        # federation.clients_per_round of all 6
        # the users with stage-3 state on disk are the sample
        sampled[name] = sorted(p.name for p in (tmp_path / name).rglob("*.user") if p.is_dir())
        assert len(sampled[name]) == 2, sampled[name]
        table = (tmp_path / name / "table.md").read_text()
        assert "a fixed sample of 2 clients" in table and "holding about 6 users" in table
        # 3 of 6 users trained in the shared rounds, 2 of 6 (the sample) for tiny's one stage-3 epoch
        assert "population 0.50, group 0.50, user 0.33" in table
    assert sampled["a"] == sampled["b"]                   # another run seed: the same users
    assert sampled["c"] != sampled["a"]                   # another sample seed: others


def test_eval_clients_is_refused_by_proper_local(tmp_path):
    from shared.runtime.config import ConfigError, load_config
    from sim.local import run_local
    with pytest.raises(ConfigError, match="eval.clients"):
        run_local(load_config("tiny", ["eval.clients=2"]), tmp_path / "r")
    with pytest.raises(ConfigError, match="eval.clients"):
        load_config("tiny", ["eval.clients=0"])
