"""Which linear layers of a backbone get LoRAs: the FFN layers of the known model families, found
by module name (the form PEFT's ``target_modules`` takes), or the ones a config names."""

from __future__ import annotations

from torch import nn

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
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    some = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
    raise TargetError(
        f"model {name!r} ({type(model).__name__}): cannot tell its FFN layers (no known layout "
        f"and no *mlp / *feed_forward module); name the LoRA targets with model.targets=[...] "
        f"(override=[...]: module-name suffixes of its MLP linears); its linear layer names: {some}"
    )


class TargetError(ValueError):
    """No FFN layers found in a model: the message names the model and its linear layers."""
