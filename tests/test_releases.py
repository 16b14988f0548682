"""Every release accounted (shared/runtime/releases.py): tiny federations on the in-process engine,
every reply the server hears captured where it hears them (Federation._exchange, before the reply
checks), and each record key held against the registry; the run's table names what its epsilon does
not cover. The same runs study privacy.mixtures over two group rounds (docs/results/privacy.md)."""
import json

import pytest
import torch

from shared.runtime.config import load_config

DP = ["privacy.dp.noise_multiplier=1.0", "privacy.dp.clip=0.5", "privacy.dp.seed=4"]
BASE = ["simulation.engine=inprocess", "eval.stages=[population,group,user]", "eval.splits=[test]"]


def test_the_registry_is_well_formed_and_protections_follow_the_config():
    from server.privacy import messages_of
    from shared.runtime import releases as R
    from shared.runtime.protocol import EVALUATE, QUERY_MIXTURES, TRAIN_GROUP
    for r in R.REGISTRY:
        assert r.what and r.keys and R.protection_of(r, load_config("tiny")) in R.PROTECTIONS, r
    mixtures = R.matches(TRAIN_GROUP, "routing", "mixtures")[0]
    assert {how: R.protection_of(mixtures, load_config("tiny", [f"privacy.mixtures={how}"]))
            for how in ("share", "noise", "local")} == {"share": "none", "noise": "noised", "local": "not sent"}
    update = R.matches(TRAIN_GROUP, "arrays", "layers.0.expert_A")[0]
    assert R.protection_of(update, load_config("tiny", DP)) == "dp"
    assert R.protection_of(update, load_config("tiny")) == "aggregated only"
    assert R.unlisted(TRAIN_GROUP, {"routing": ["routing_mass", "user_ids"]}) == ["train.group routing/user_ids"]
    assert QUERY_MIXTURES not in messages_of(load_config("tiny", ["privacy.mixtures=local"]))
    assert "query.signature" in messages_of(load_config("tiny", ["group.assign_start=signature",
                                                                  "group.constraint_form=assign"]))
    assert messages_of(load_config("tiny", ["method=population"]))[-1] == EVALUATE
    table = R.release_table(load_config("tiny", DP))
    assert table.count("\n") == len(R.REGISTRY) + 1 and "| dp |" in table


class Wire:
    """What crossed the wire in a run: (message type, records sent, records replied: {name: keys})."""

    def __init__(self):
        self.seen: list[tuple[str, dict, dict]] = []

    def install(self, monkeypatch):
        from server.federation import Federation
        real = Federation._exchange
        wire = self

        def exchange(fed, step, msgs):
            replies = real(fed, step, msgs)
            sent = {m.metadata.message_id: m for m in msgs}
            for r in replies:
                m = sent.get(r.metadata.reply_to_message_id)
                if m is None or r.has_error():
                    continue
                wire.seen.append((m.metadata.message_type, records(m), records(r),
                                  {k: v for k, v in r.content.array_records.items()}))
            return replies
        monkeypatch.setattr(Federation, "_exchange", exchange)
        return self

    def types(self) -> set[str]:
        return {t for t, *_ in self.seen}


def records(msg) -> dict[str, list[str]]:
    c = msg.content
    return {name: list(rec.keys()) for group in (c.array_records, c.metric_records, c.config_records)
            for name, rec in group.items()}


def check_registry(wire: Wire, cfg):
    """Every record key a client sent is in the registry; every message type sent is in the run's
    release table (messages_of)."""
    from server.privacy import messages_of
    from shared.runtime.releases import unlisted
    missing = sorted({u for mtype, _, replied, _ in wire.seen for u in unlisted(mtype, replied)})
    assert not missing, f"reply records the release registry does not list: {missing}"
    assert wire.types() <= set(messages_of(cfg)), wire.types() - set(messages_of(cfg))


def run(tmp_path, monkeypatch, name: str, overrides: list[str]):
    from sim.run import run_sim
    wire = Wire().install(monkeypatch)
    assert run_sim("tiny", [*BASE, f"output.dir={tmp_path}", f"output.name={name}", *overrides]) == 0
    monkeypatch.undo()
    from shared.runtime.config import read_config
    return wire, read_config(tmp_path / name / "config.yaml")


def train_records(path, stage):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "train" and json.loads(line).get("stage") == stage]


@pytest.mark.slow
def test_every_release_of_private_runs_is_registered_and_named_in_the_table(tmp_path, monkeypatch):
    """DP with Poisson sampling and noised mixtures over two group rounds; DP with the signature start
    (its k-means and EM statistics). Every reply record is in the registry; the table lists what
    the epsilon leaves out."""
    from shared.data.synthetic import write_synthetic_lamp
    wire, cfg = run(tmp_path, monkeypatch, "dp-poisson-noise",
                    [*DP, "federation.sampling=poisson", "federation.fraction_train=0.75", "group.rounds=2",
                     "privacy.mixtures=noise", "privacy.mixture_noise=0.3"])
    check_registry(wire, cfg)
    assert {"train.population", "train.group", "query.mixtures", "train.user", "evaluate"} <= wire.types()
    # noised mixtures reach the server and go on in the pool of round 2: not held to [0, 1] by the reply checks
    noised = [a["routing"]["mixtures"].numpy() for t, _, _, a in wire.seen if t in ("train.group", "query.mixtures")]
    assert noised and any(((m < 0) | (m > 1)).any() for m in noised if m.size)
    second = [sent for t, sent, _, _ in wire.seen if t == "train.group"]
    assert second and all(s["others"] == ["mixtures"] for s in second)   # the noised pool goes on
    table = (tmp_path / "dp-poisson-noise" / "table.md").read_text()
    assert "releases not covered by the epsilon above" in table and "| train.group | routing | mixtures |" in table
    assert "| noised |" in table and "amplified by Poisson sampling" in table
    assert len(train_records(tmp_path / "dp-poisson-noise", "group")) == 2

    data = write_synthetic_lamp(tmp_path / "syn", n_users=6, n_groups=2, min_profile=3, max_profile=5, seed=0)
    wire, cfg = run(tmp_path, monkeypatch, "dp-signature",
                    [*DP, f"data.path={data}", "adapters.k=2", "group.constraint_form=assign",
                     "group.assign_start=signature", "group.reassign=false", "group.signature_codes=3"])
    check_registry(wire, cfg)
    replied = {k for t, _, r, _ in wire.seen if t == "query.signature" for k in r.get("signature", [])}
    assert {"sum", "count", "answer_sum", "answer_count", "inertia", "counts", "mass", "loglik"} <= replied
    table = (tmp_path / "dp-signature" / "table.md").read_text()
    assert "query.signature signature/" in table      # named among what the epsilon does not cover


@pytest.mark.slow
def test_the_mixtures_channel_over_two_group_rounds(tmp_path, monkeypatch):
    """privacy.mixtures=share against local, group.rounds=2, no DP. share: every group round's
    message after the first pool carries the pool (the round before's mixtures), and the one-user
    clients' constraint loss pushes from it. local: no first-pool query (no message round that
    would come back empty), no pool in any group message, every reply's mixtures empty, no
    constraint loss on one-user clients; both train both rounds. Every reply record registered."""
    runs = {how: run(tmp_path, monkeypatch, how, ["group.rounds=2", f"privacy.mixtures={how}"])
            for how in ("share", "local")}
    for how, (wire, cfg) in runs.items():
        check_registry(wire, cfg)
        rounds = train_records(tmp_path / how, "group")
        assert [r["round"] for r in rounds] == [1, 2], how
    share, _ = runs["share"]
    sent = [s for t, s, _, _ in share.seen if t == "train.group"]
    assert len(sent) == 8 and all(s["others"] == ["mixtures"] for s in sent)   # 4 clients x 2 rounds, a pool each
    assert "query.mixtures" in share.types()
    pools = [a["routing"]["mixtures"].numpy().shape[0] for t, _, _, a in share.seen if t == "train.group"]
    assert pools == [1] * 8
    local, _ = runs["local"]
    assert "query.mixtures" not in local.types()
    assert not any(s["others"] for t, s, _, _ in local.seen if t == "train.group")   # an empty record: no pool
    assert all(a["routing"]["mixtures"].numpy().shape[0] == 0 for t, _, _, a in local.seen if t == "train.group")
    cons = {how: [r["constraint_loss"] for r in train_records(tmp_path / how, "group")] for how in runs}
    assert all(c == 0 for c in cons["local"]) and all(c > 0 for c in cons["share"]), cons
    from server.checkpoint import Checkpoint
    _, parts = Checkpoint(tmp_path / "share").load()
    assert parts["mixtures"] is not None and torch.isfinite(parts["mixtures"]).all()
