"""Moved: a client's signature replies are client/signature_replies.py (answer, kept_groups).
Kept only until client/client_app.py and client/trainer.py import from there; then delete this file."""
import client.signature_replies as _moved


def __getattr__(name):
    return getattr(_moved, name)
