"""Files: PEFT adapters that PEFT itself loads, the group file, the user store, bad files."""
import pytest
import torch
from peft import PeftModel

from shared.runtime.backbone import load_backbone
from shared.runtime.persist import (
    StateFileError,
    UserStore,
    export_peft_adapter,
    import_peft_adapter,
    load_group,
    save_group,
    save_tensors,
)
from tests.helpers import IDS, logits, make_model, randomize


def test_population_lora_is_a_peft_adapter(tmp_path):
    model, _ = make_model()
    randomize(model, "population")
    model.set_stage("population")
    ours = logits(model)
    export_peft_adapter(model, "population", tmp_path / "population", base_model="tiny")
    bare, _ = load_backbone("tiny", seed=0)
    peft = PeftModel.from_pretrained(bare, str(tmp_path / "population"))
    with torch.no_grad():
        theirs = peft(input_ids=IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_user_lora_is_a_peft_adapter_on_the_population_merged_backbone(tmp_path):
    model, _ = make_model()
    randomize(model, "population")
    model.merge_population()
    randomize(model, "user", seed=3)
    with torch.no_grad():  # the user LoRA alone on W_p: experts off
        for _, layer in model.layers():
            layer.expert_B.zero_()
    model.set_stage("user")
    ours = logits(model, torch.zeros(1, 16))
    export_peft_adapter(model, "user", tmp_path / "u1")
    # the PEFT base: a fresh backbone with the population LoRA merged in by PEFT itself
    export_peft_adapter(model, "population", tmp_path / "population")
    base, _ = load_backbone("tiny", seed=0)
    wp = PeftModel.from_pretrained(base, str(tmp_path / "population")).merge_and_unload()
    peft = PeftModel.from_pretrained(wp, str(tmp_path / "u1"))
    with torch.no_grad():
        theirs = peft(input_ids=IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_peft_round_trip_into_a_fresh_model(tmp_path):
    a, _ = make_model()
    randomize(a, "population", seed=7)
    export_peft_adapter(a, "population", tmp_path / "p")
    b, _ = make_model()
    import_peft_adapter(b, "population", tmp_path / "p")
    for k, v in a.part_state("population").items():
        assert torch.equal(v, b.part_state("population")[k])


def test_group_file_round_trip_and_mismatch(tmp_path):
    a, _ = make_model()
    randomize(a, "group", seed=9)
    save_group(a, tmp_path / "group.safetensors")
    b, _ = make_model()
    load_group(b, tmp_path / "group.safetensors")
    assert all(torch.equal(v, b.part_state("group")[k]) for k, v in a.part_state("group").items())
    c, _ = make_model(k=3)
    with pytest.raises(StateFileError, match="k=5"):
        load_group(c, tmp_path / "group.safetensors")


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    model, _ = make_model()
    bad = tmp_path / "group.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(StateFileError, match="group.safetensors"):
        load_group(model, bad)
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(StateFileError, match="not a PROPER group file"):
        load_group(model, tmp_path / "other.safetensors")
    with pytest.raises(StateFileError, match="no such state file"):
        load_group(model, tmp_path / "missing.safetensors")
    with pytest.raises(StateFileError, match="not a PEFT adapter"):
        import_peft_adapter(model, "population", tmp_path)


def test_wrong_shapes_are_named(tmp_path):
    model, _ = make_model()
    state = model.part_state("group")
    key = next(iter(state))
    state[key] = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model.load_part_state("group", state)


def test_user_store_is_private_per_user_and_atomic(tmp_path):
    store = UserStore(tmp_path)
    store.save("user/1", "embedding", {"e_u": torch.ones(4)})
    store.save("user_1", "embedding", {"e_u": torch.zeros(4)})
    assert torch.equal(store.load("user/1", "embedding")["e_u"], torch.ones(4))
    assert torch.equal(store.load("user_1", "embedding")["e_u"], torch.zeros(4))
    assert store.load("nobody", "embedding") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    # a file renamed onto another user's name is refused
    store.path("user_1", "embedding").replace(store.path("user_2", "embedding"))
    with pytest.raises(StateFileError, match="belongs to user"):
        store.load("user_2", "embedding")
