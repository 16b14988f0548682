"""Moved: the signature start's server rounds are server/signature_rounds.py (signature_start).
Kept only until server/stages.py imports from there; then delete this file."""
import server.signature_rounds as _moved


def __getattr__(name):
    return getattr(_moved, name)
