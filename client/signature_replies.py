"""A client's replies to the signature start's rounds (group.assign_start=signature in a federation;
the hook: shared/method/signature_start.py; the sums: shared/method/signature_sums.py; the server's
rounds: server/signature_rounds.py).

One message type, query.signature, in four phases. The client reads its users' items once and keeps
the readings on its own disk (<state dir>/signature/); every later phase answers from them:
  read    population in: the items are read by the population model; sums come back
  codes   mean and centroids in: per-centroid sums and counts of the unit-centred readings come back
  em      mean, centroids (and the maps, after the first EM round) in: per-map weighted counts come back
  assign  the best maps in: each user's group is decided here and kept here (groups.json), and the
          group stage's assignment starts from it; nothing but the user count comes back
"""
from __future__ import annotations

import json
import logging

import torch

from shared.method import signature_sums as S
from shared.method.answer_signatures import item_readings, without_canaries
from shared.method.signature_start import signature_start_of
from shared.runtime.persist import atomic_write_text, load_tensors, save_tensors

GROUPS_FILE = "groups.json"
log = logging.getLogger("proper.client")


def _dir(trainer):
    return trainer.store.root / "signature"


def _read(trainer, population: dict) -> dict:
    """Read every training item of this client's users (canaries left out) with the population
    model; keep the readings privately."""
    users = without_canaries(trainer.trained)
    h = trainer.model.lm.config.hidden_size
    if any(u.train for u in users):
        trainer.prepare("group", population)
        max_len = signature_start_of(trainer.cfg).max_len
        inp, _, who = item_readings(trainer.model, trainer.tokenizer, users, max_len)
    else:
        inp, who = torch.zeros(0, h), torch.zeros(0, dtype=torch.long)
    answers = S.answer_index(trainer.spec, [x.output for u in users for x in u.train])
    save_tensors(_dir(trainer) / "items.safetensors", {"readings": inp.float(), "answers": answers, "who": who})
    return S.read_stats(inp, answers, len(trainer.spec.labels))


def _items(trainer):
    path = _dir(trainer) / "items.safetensors"
    if not path.exists():
        raise RuntimeError(f"{path}: no item readings: the signature round 'read' did not reach this client")
    t, _ = load_tensors(path)
    return t["readings"], t["answers"], t["who"]


def _counts(trainer, arrays: dict) -> torch.Tensor:
    readings, answers, who = _items(trainer)
    codes = S.nearest(S.unit_centred(readings, arrays["mean"]), arrays["centroids"])
    return S.user_counts(codes, answers, who, len(trainer.trained), len(arrays["centroids"]), len(trainer.spec.labels))


def answer(trainer, config, population: dict | None, arrays: dict | None) -> dict:
    """This client's reply to one signature round: {name: tensor} sums over its users only."""
    phase = str(config["phase"])
    if phase == "read":
        return _read(trainer, population)
    if phase == "codes":
        readings, _, _ = _items(trainer)
        return S.code_stats(S.unit_centred(readings, arrays["mean"]), arrays["centroids"])
    counts = _counts(trainer, arrays)
    keys = [u.user_id for u in trainer.trained]
    if phase == "em":
        if "log_maps" not in arrays:   # the first EM round: a seeded random start per user
            resp = S.random_responsibilities(keys, int(config["restarts"]), int(config["k"]), int(config["seed"]))
            return S.em_stats(counts, resp)
        return S.em_stats(counts, *S.em_responsibilities(counts, arrays["log_maps"], arrays["log_prior"]))
    if phase == "assign":
        resp, _ = S.em_responsibilities(counts, arrays["log_maps"].unsqueeze(0), arrays["log_prior"].unsqueeze(0))
        groups = {u: int(g) for u, g in zip(keys, resp[0].argmax(-1).tolist())}
        atomic_write_text(_dir(trainer) / GROUPS_FILE, json.dumps(groups, indent=1))
        return {}
    raise ValueError(f"query.signature: unknown phase {phase!r}")


def kept_groups(trainer) -> torch.Tensor | None:
    """[U] the groups the signature rounds decided for this client's users (trained order), or None
    where this client missed them (it was down during the read or assign round, or its state was
    lost): its users then start from the seeded hash, as with group.assign_start=random, and the
    run goes on rather than failing this client in every group round."""
    path = _dir(trainer) / GROUPS_FILE
    groups = json.loads(path.read_text()) if path.exists() else {}
    missing = [u.user_id for u in trainer.trained if u.user_id not in groups]
    if missing:
        log.warning("%s: no signature group for %d of this client's %d user(s): they start from the seeded "
                    "hash (group.assign_start=random)", path, len(missing), len(trainer.trained))
        return None
    return torch.tensor([groups[u.user_id] for u in trainer.trained])
