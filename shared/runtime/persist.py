"""Files: atomic writes, PEFT adapter export, the group file, the client's private user store.

Formats (docs/formats.md describes them for people who read the files without this code):
- population LoRA and each user LoRA: standard PEFT LoRA adapter directories
  (adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained` loads onto
  the backbone (the user LoRA onto the population-merged backbone W_p);
- experts and routers: one safetensors file, tensors named `<layer>.<param>`, metadata
  {"format": "proper-group", "k", "r_group", "alpha_group", "d_user", "layers"};
- the user store: one safetensors file per user and kind under the client's state directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class StateFileError(ValueError):
    """A state file that is missing, corrupt, or does not fit the model."""


def atomic_write_bytes(path: str | Path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str):
    atomic_write_bytes(path, text.encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """safetensors file written atomically (temp file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise StateFileError(f"{path}: corrupt or not a safetensors file ({e})") from e
    return tensors, {k: _maybe_json(v) for k, v in meta.items()}


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


# ---------------------------------------------------------------- PEFT adapters
def _peft_config(model, part: str):
    from peft import LoraConfig
    layer = model.layers()[0][1]
    r = {"population": layer.lora_A.shape[0], "user": layer.user_A.shape[0]}[part]
    scaling = {"population": layer.scaling, "user": layer.user_scaling}[part]
    return LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0, bias="none",
                      target_modules=list(model.targets), task_type="CAUSAL_LM",
                      fan_in_fan_out=layer.fan_in_fan_out)


def export_peft_adapter(model, part: str, out_dir: str | Path, base_model: str = ""):
    """Write the population or the (currently loaded) user LoRA as a PEFT adapter directory."""
    if part not in ("population", "user"):
        raise ValueError("only the population LoRA and user LoRAs are PEFT adapters")
    a, b = ("lora_A", "lora_B") if part == "population" else ("user_A", "user_B")
    tensors = {}
    for name, layer in model.layers():
        tensors[f"base_model.model.{name}.lora_A.weight"] = getattr(layer, a).detach().float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = getattr(layer, b).detach().float()
    cfg = _peft_config(model, part)
    cfg.base_model_name_or_path = base_model
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent if out_dir.parent.exists() else None,
                                prefix=f".{out_dir.name}."))
    try:
        cfg.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_peft_adapter(model, part: str, adapter_dir: str | Path) -> dict:
    """The LoRA tensors of a PEFT adapter directory (export_peft_adapter's, or PEFT's own), named as
    the model's `part` names them ({layer}.lora_A / user_A, ...), without loading them into it."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise StateFileError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    tensors, _ = load_tensors(adapter_dir / "adapter_model.safetensors")
    a, b = ("lora_A", "lora_B") if part == "population" else ("user_A", "user_B")
    state = {}
    for name in model.layer_names:
        for src, dst in (("lora_A", a), ("lora_B", b)):
            key = next((k for k in (f"base_model.model.{name}.{src}.weight",
                                    f"base_model.model.{name}.{src}.default.weight") if k in tensors), None)
            if key is None:
                raise StateFileError(f"{adapter_dir}: adapter has no {src} for layer {name}")
            state[f"{name}.{dst}"] = tensors[key]
    return state


def import_peft_adapter(model, part: str, adapter_dir: str | Path):
    """Load a PEFT adapter directory written by export_peft_adapter (or PEFT itself)."""
    state = read_peft_adapter(model, part, adapter_dir)
    if part == "user":  # the LoRA-aware router is not part of the PEFT adapter; keep the loaded one
        for k, v in model.part_state("user").items():
            state.setdefault(k, v)
    try:
        model.load_part_state(part, state, source=str(adapter_dir))
    except ValueError as e:
        raise StateFileError(str(e)) from e


# ---------------------------------------------------------------- the group file
def save_group(model, path: str | Path):
    layer = model.layers()[0][1]
    meta = {"format": "proper-group", "k": model.k, "r_group": layer.r_group,
            "alpha_group": layer.expert_scaling * layer.r_group, "d_user": model.d_user,
            "layers": model.layer_names}
    save_tensors(path, model.part_state("group"), meta)


def load_group(model, path: str | Path):
    tensors, meta = load_tensors(path)
    if meta.get("format") != "proper-group":
        raise StateFileError(f"{path}: not a PROPER group file (format={meta.get('format')!r})")
    if int(meta.get("k", -1)) != model.k:
        raise StateFileError(f"{path}: has k={meta.get('k')} experts, this model has k={model.k}")
    try:
        model.load_part_state("group", tensors, source=str(path))
    except ValueError as e:
        raise StateFileError(str(e)) from e


# ---------------------------------------------------------------- the client's private user store
class UserStore:
    """Private per-user state on the client's own disk: e_u (stage 2), user LoRA + router (stage 3).

    One file per user and kind, named from the user id (made filename-safe, plus a short hash so
    two ids never share a file). Nothing here is ever sent to the server.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, user_id: str, kind: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(user_id))[:40]
        digest = hashlib.sha1(str(user_id).encode()).hexdigest()[:8]
        return self.root / f"{safe}-{digest}.{kind}.safetensors"

    def save(self, user_id: str, kind: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
        save_tensors(self.path(user_id, kind), tensors, {"user": str(user_id), "kind": kind, **(metadata or {})})

    def load(self, user_id: str, kind: str) -> dict[str, torch.Tensor] | None:
        path = self.path(user_id, kind)
        if not path.exists():
            return None
        tensors, meta = load_tensors(path)
        if str(meta.get("user")) != str(user_id):
            raise StateFileError(f"{path}: belongs to user {meta.get('user')!r}, not {user_id!r}")
        return tensors
