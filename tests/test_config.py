"""The configuration schema (shared/runtime/schema.py) and its loader (shared/runtime/config.py)."""
import inspect

import pytest
from omegaconf import OmegaConf

from shared.runtime import schema
from shared.runtime.config import CONFIG_DIR, ConfigError, load_config, read_config, server_cfg, stage_cfg, to_yaml


def test_default_yaml_holds_every_key_of_the_schema_with_its_default():
    """configs/default.yaml documents the schema: same keys, same values (the schema is the source)."""
    assert OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "default.yaml")) == schema.defaults()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_config_loads(name):
    cfg = load_config(name)
    assert cfg.method in schema.METHODS and cfg.population.rounds >= 0


def test_synthetic_section_has_the_generators_arguments_and_defaults():
    from shared.data.synthetic import write_synthetic_lamp
    params = inspect.signature(write_synthetic_lamp).parameters
    expected = {k: p.default for k, p in params.items() if k not in ("out_dir", "seed")}
    assert OmegaConf.to_container(OmegaConf.structured(schema.Synthetic)) == expected


def test_choice_lists_agree_with_the_code_that_uses_them():
    from shared.runtime.backbone import DTYPES
    assert schema.Model._rules["dtype"].expected == "one of " + " | ".join(DTYPES)
    optim = pytest.importorskip("shared.method.optim")
    assert schema.Train._rules["optimizer"].expected == "one of " + " | ".join(optim.OPTIMIZERS)
    assert schema.Train._rules["lr_schedule"].expected == "one of " + " | ".join(optim.LR_SCHEDULES)


@pytest.mark.parametrize("override, message", [
    ("method=fedprox", "method: expected one of proper | population | oppu | loramoe | mta | rag, got 'fedprox'"),
    ("eval.mode=sample", "eval.mode: expected one of generate | score"),
    ("train.bf16=fast", "train.bf16: expected true, false or auto, got 'fast'"),
    ("train.bf16=1", "train.bf16: expected true, false or auto, got 1"),
    ("train.optimizer=adam", "train.optimizer: expected one of adamw | sgd"),
    ("train.lr_schedule=linear", "train.lr_schedule: expected one of constant | cosine"),
    ("federation.server_opt=fedprox", "federation.server_opt: expected one of fedavg | fedavgm | fedadam | fedyogi"),
    ("federation.chains=0", "federation.chains: expected >= 1, got 0"),
    ("federation.clients_per_round=0", "federation.clients_per_round: expected >= 1, got 0"),
    ("population.lr=0", "population.lr: expected > 0"),
    ("mta.anchor.lr=-1e-3", "mta.anchor.lr: expected > 0"),
    ("federation.server_lr=0", "federation.server_lr: expected > 0"),
    ("eval.splits=[test,dev]", "eval.splits: expected a list of test | val, got ['test', 'dev']"),
    # a stage's override of a train key or a server key is checked as that key is
    ("user.optimizer=adam", "user.optimizer: expected one of adamw | sgd"),
    ("group.server_opt=fedprox", "group.server_opt: expected one of fedavg"),
    ("train.batch_size=many", "train.batch_size: Value 'many' of type 'str' could not be converted to Integer"),
    ("train.batch_size=null", "train.batch_size: Incompatible value 'None'"),
])
def test_refused_values_name_the_key_the_allowed_values_and_the_override(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value) and f"override {override!r}" in str(e.value)


@pytest.mark.parametrize("override, key", [("train.batchsize=4", "train.batchsize"), ("zzz=1", "zzz"),
                                           ("user.rounds=2", "user.rounds"), ("mta.user.top_k=3", "mta.user.top_k"),
                                           ("data.synthetic.users=3", "data.synthetic.users")])
def test_unknown_keys_are_refused_naming_them_and_the_keys_there_are(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'") as e:
        load_config("tiny", [override])
    assert "has: " in str(e.value)


def test_errors_name_the_file_that_set_the_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimizer: adam\n")
    with pytest.raises(ConfigError, match=f"{bad}: train.optimizer: expected one of adamw | sgd"):
        load_config(bad)
    bad.write_text("group: {rounds: 1, cosntraint_weight: 0.2}\n")
    with pytest.raises(ConfigError, match="unknown key 'group.cosntraint_weight'"):
        load_config(bad)
    # a later override that fixes the value wins: the final value is what is checked
    bad.write_text("train:\n  optimizer: adam\n")
    assert load_config(bad, ["train.optimizer=sgd"]).train.optimizer == "sgd"


def test_a_val_split_without_held_out_items_is_refused_before_training():
    with pytest.raises(ConfigError, match="eval.splits: val scores the held-out profile items, but data.holdout is 0"):
        load_config("tiny", ["eval.splits=[test,val]"])
    assert list(load_config("tiny", ["eval.splits=[test,val]", "data.holdout=1"]).eval.splits) == ["test", "val"]


def test_removed_keys_say_what_replaced_them():
    with pytest.raises(ConfigError, match="federation.schedule is gone: federation.chains=1 is the sequential"):
        load_config("tiny", ["federation.schedule=sequential"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("tiny", ["train.batch_size"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", ["eval.splits=[test"])
    with pytest.raises(ConfigError, match="train: .*not a subclass"):
        load_config("tiny", ["train=5"])


def test_a_stage_overrides_train_keys_and_null_leaves_trains_value():
    cfg = load_config("lamp2_quick", ["train.max_len=128", "group.max_len=96", "population.batch_size=null"])
    user, group, pop = (stage_cfg(cfg, s) for s in ("user", "group", "population"))
    assert (user.batch_size, user.max_len, user.lr, user.epochs) == (4, 128, 3.0e-3, 1)
    assert (group.batch_size, group.max_len, group.constraint_weight, group.rounds) == (2, 96, 0.1, 1)  # the config's
    assert pop.batch_size == 8   # null: not overridden, train's value stays
    # the resolved config leaves unset overrides out, so even a plain merge of train with a stage is right
    assert "batch_size" not in cfg.population and "server_momentum" not in cfg.group
    assert OmegaConf.merge(cfg.train, cfg.population) == pop
    anchor = stage_cfg(load_config("tiny", ["mta.anchor.batch_size=2"]), "mta.anchor")
    assert (anchor.batch_size, anchor.epochs, anchor.lr, anchor.max_len) == (2, 8, 1.0e-3, 96)
    from shared.method.mta import train_cfg
    assert train_cfg(load_config("tiny", ["mta.user.lr=0.5"]), "user").lr == 0.5


def test_a_stage_overrides_the_federations_server_optimizer():
    cfg = load_config("tiny", ["federation.server_lr=3", "group.server_lr=5", "population.server_opt=fedadam",
                               "group.server_opt=null"])
    assert dict(server_cfg(cfg, "population")) == {"server_opt": "fedadam", "server_lr": 3.0, "server_momentum": 0.0,
                                                   "beta_1": 0.9, "beta_2": 0.99, "tau": 1.0e-3}
    assert (server_cfg(cfg, "group").server_opt, server_cfg(cfg, "group").server_lr) == ("fedavg", 5.0)


def test_the_config_reads_as_before_and_round_trips_through_config_yaml(tmp_path):
    cfg = load_config("tiny", ["debug.crash_after=group:1", "debug.fail_partitions=[1]", "simulation.client_cpus=2",
                               "federation.audit_replies=true", "group.server_lr=2"])
    # what the code does with it today: attribute access, .get with a default, `in`, assignment
    assert cfg.train.batch_size == 4 and cfg.data.get("synthetic").n_users == 4
    assert cfg.eval.get("max_new_tokens", 9) == 4 and cfg.output.get("name") is None
    assert cfg.federation.get("schedule", "parallel") == "parallel" and "schedule" not in cfg.federation
    assert cfg.group.get("server_lr") == 2 and cfg.population.get("server_lr") is None
    assert str(cfg.get("debug", {}).get("crash_after", "")) == "group:1" and list(cfg.debug.fail_partitions) == [1]
    assert cfg.get("simulation").get("client_cpus") == 2 and cfg.federation.get("audit_replies") is True
    cfg.federation.min_available_clients = 4        # sim/run.py does this before writing it back
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    back = read_config(tmp_path / "config.yaml")
    assert back == cfg and OmegaConf.load(tmp_path / "config.yaml") == cfg
    assert read_config(tmp_path / "config.yaml") is not read_config(tmp_path / "config.yaml")  # copies
    # a config.yaml from another version of the code is refused when read back, naming the key
    (tmp_path / "config.yaml").write_text(to_yaml(cfg) + "extra: 1\n")
    with pytest.raises(ConfigError, match="config.yaml: unknown key 'extra'"):
        read_config(tmp_path / "config.yaml")


def test_bf16_is_checked_by_the_schemas_rule_wherever_it_comes_from():
    from shared.runtime.precision import use_bf16
    assert use_bf16(False) is False and use_bf16(True) is True
    with pytest.raises(ConfigError, match="train.bf16: expected true, false or auto, got 'AUTO'"):
        use_bf16("AUTO")
