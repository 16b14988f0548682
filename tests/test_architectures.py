"""Any local Hugging Face causal LM as model.name=<dir>: a tiny random model of each family people use
(Llama, Qwen2, Mistral, Gemma, Phi-3 with its fused gate_up_proj, GPT-2 with its Conv1D layers), built
from a config in code and saved with the byte-level tokenizer of "tiny" (no hub). For each: the FFN
targets found, the three stages run (`proper local`), the population and user LoRAs exported as PEFT
adapters that PEFT loads to the run's logits, and `proper generate` answering."""
from __future__ import annotations

import pytest
import torch
import transformers as hf
from torch import nn

from shared.runtime.backbone import byte_tokenizer, load_backbone
from shared.runtime.targets import TargetError, find_target_modules

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
FAMILIES = {  # name: (config class, model class, sizes, the FFN targets it must get)
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, SMALL, ["gate_proj", "up_proj", "down_proj"]),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, SMALL, ["gate_proj", "up_proj", "down_proj"]),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, dict(SMALL, sliding_window=None),
                ["gate_proj", "up_proj", "down_proj"]),
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, dict(SMALL, head_dim=8), ["gate_proj", "up_proj", "down_proj"]),
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, SMALL, ["gate_up_proj", "down_proj"]),
    "gpt2": (hf.GPT2Config, hf.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
             ["mlp.c_fc", "mlp.c_proj"]),
}
IDS = torch.tensor([[5, 70, 80, 90, 100, 3, 44, 60]])


def build_family(name: str, out) -> str:
    """A random `name` model saved with the byte tokenizer into `out`; its directory."""
    config_cls, model_cls, sizes, _ = FAMILIES[name]
    tok = byte_tokenizer()
    config = config_cls(**sizes, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ffn_layers_are_found_per_family(family_dirs, family):
    lm, _ = load_backbone(family_dirs[family])
    assert find_target_modules(lm) == FAMILIES[family][3]


def test_a_model_without_ffn_layers_is_refused_naming_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = hf.PretrainedConfig(name_or_path="/models/odd-7b")
            self.proj = nn.Linear(4, 4)

    with pytest.raises(TargetError, match=r"model '/models/odd-7b' \(Odd\).*model\.targets.*\['proj'\]"):
        find_target_modules(Odd())


def _user_dir(run, user_id):
    from client.serving import private_path
    from shared.runtime.persist import UserStore
    return private_path(UserStore(run / "client_state"), user_id, "user")


@pytest.mark.parametrize("family", FAMILIES)
def test_three_stages_peft_export_and_generate_per_family(family_dirs, family, tmp_path, capsys):
    from peft import PeftModel

    from shared.method.model import ProperModel
    from shared.runtime.config import load_config
    from shared.runtime.persist import import_peft_adapter
    from sim.cli import main
    from sim.local import run_local

    path = family_dirs[family]
    cfg = load_config("tiny", [f"model.name={path}", "eval.stages=[user]", "data.synthetic.n_users=2",
                               "eval.max_new_tokens=2", "population.rounds=1", "group.rounds=1"])
    run = tmp_path / "run"
    run_local(cfg, run)
    assert (run / "table.md").is_file() and (run / "group.safetensors").is_file()

    # the population LoRA: PEFT on the bare backbone gives stage 1's logits
    ours = ProperModel(load_backbone(path)[0], FAMILIES[family][3], seed=cfg.seed, **cfg.adapters)
    import_peft_adapter(ours, "population", run / "population_lora")
    ours.set_stage("population")
    peft = PeftModel.from_pretrained(load_backbone(path)[0], str(run / "population_lora"))
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, peft(input_ids=IDS).logits, atol=1e-5)

    # a user's LoRA: PEFT on the population-merged backbone gives the user LoRA alone (experts off)
    user_id = "u0000"
    ours.merge_population()
    import_peft_adapter(ours, "user", _user_dir(run, user_id))
    with torch.no_grad():
        for _, layer in ours.layers():
            layer.expert_B.zero_()
    ours.set_stage("user")
    wp = PeftModel.from_pretrained(load_backbone(path)[0], str(run / "population_lora")).merge_and_unload()
    peft_user = PeftModel.from_pretrained(wp, str(_user_dir(run, user_id)))
    with torch.no_grad():
        assert torch.allclose(ours(IDS, user_emb=torch.zeros(1, ours.d_user)).logits, peft_user(input_ids=IDS).logits,
                              atol=1e-4)

    # proper generate answers with the user's stage-3 model
    capsys.readouterr()
    assert main(["generate", str(run), "--user", user_id, "--prompt", "a film about robots", "--max-new-tokens",
                 "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
