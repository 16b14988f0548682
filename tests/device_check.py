"""A device-consistency check that runs without a GPU: every tensor is tagged "client" (on the client's
device) or "host" (the CPU), and an operation that mixes the two, as CUDA would refuse, is recorded.

On a CPU-only machine the client's device and the host are the same hardware, so nothing fails by
itself; the tags stand in for the two devices (a fake device, kept by a TorchFunctionMode):
  client  the model's parameters and buffers (tagged when the check starts), anything moved with
          .to(<device>) / .cuda() or made by a factory given device=..., and the results of
          operations on client tensors;
  host    tensors made without a device (torch.tensor(list), torch.zeros(n), ...) and .cpu() results.
0-dim tensors mix freely (CUDA allows a CPU scalar), as do copy_ and indexing (CUDA copies those).
Tensors made inside C++ (autograd's gradients) carry no tag and are not checked.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

CLIENT, HOST = "client", "host"
MOVES = {"to", "cuda", "type_as"}
TO_HOST = {"cpu"}
MIX_FREELY = {"copy_", "__getitem__", "__setitem__", "__get__", "__set__", "backward", "__repr__", "__format__",
              "numpy", "tolist", "item", "__len__", "__bool__", "__index__", "__int__", "__float__"}


def _name(func) -> str:
    return getattr(func, "__name__", "") or str(func)


class DeviceCheck(TorchFunctionMode):
    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        self.tags = WeakTensorKeyDictionary()
        self.mixes: list[str] = []
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                self.tags[t] = CLIENT

    def client(self, *tensors: torch.Tensor):
        """Tag tensors made before the check started as on the client's device."""
        for t in tensors:
            self.tags[t] = CLIENT

    def _tag(self, t) -> str | None:
        return self.tags.get(t) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in TO_HOST:
            tag = HOST
        elif name in MOVES and (kwargs.get("device") is not None or any(
                isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])):
            tag = CLIENT
        elif kwargs.get("device") is not None:        # a factory told where: it follows some tensor
            tag = CLIENT
        else:
            tags = {self._tag(t) for t in inputs if t.dim() > 0} - {None}
            if len(tags) > 1 and name not in MIX_FREELY:
                where = "".join(traceback.format_list(
                    [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-3:]))
                self.mixes.append(f"{name}: a host tensor with client tensors\n{where}")
            if name in MIX_FREELY and inputs:
                tag = self._tag(inputs[0])
            else:
                tag = CLIENT if CLIENT in tags else (HOST if tags or not inputs else None)
        moved = name in TO_HOST or tag == CLIENT and name in MOVES   # on the CPU .to() may return its input
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and tag is not None and (moved or t not in self.tags):
                self.tags[t] = tag
        return out

    def check(self):
        assert not self.mixes, f"{len(self.mixes)} operations mixed devices; the first:\n{self.mixes[0]}"
