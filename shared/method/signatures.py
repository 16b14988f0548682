"""Moved: the signature start is shared/method/signature_start.py (the hook and its knobs:
refuse_in_federation, uses_signature_start), answer_signatures.py (one process: signature_groups)
and signature_sums.py (a federation's sums). Kept only until client/runtime.py, client/virtual.py,
client/trainer.py and sim/run.py import from those; then delete this file."""
import shared.method.answer_signatures as _one_process
import shared.method.signature_start as _hook
import shared.method.signature_sums as _sums


def __getattr__(name):
    for module in (_hook, _one_process, _sums):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
