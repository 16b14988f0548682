"""Do two run directories hold the same numbers, bit for bit? For changes that must change no result
(docs/architecture.md, "The reshaping changed no number").

    python -m bench.same_numbers RUN_A RUN_B

Compares every safetensors tensor under the two directories (shared parts, the checkpoint, every
client's e_u and user adapters), every number of table.json and of rounds.jsonl except timings, and
prints IDENTICAL or DIFFERENT (exit status 0 or 1) with the first differences.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from shared.runtime.persist import load_tensors

TIMINGS = ("seconds", "tokens_per_s", "time", "wall")


def tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.rglob("*.safetensors")):
        for key, value in load_tensors(f)[0].items():
            out[f"{f.relative_to(root)}::{key}"] = value
    return out


def numbers(obj, prefix: str = ""):
    """(path, number) of every number in a JSON value, timings left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(t in k for t in TIMINGS):
                yield from numbers(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def json_numbers(path: Path) -> dict:
    if path.suffix == ".jsonl":
        return dict(numbers([json.loads(line) for line in path.read_text().splitlines()]))
    return dict(numbers(json.loads(path.read_text())))


def differences(a: Path, b: Path) -> list[str]:
    found = []
    ta, tb = tensors(a), tensors(b)
    found += [f"tensor only in one run: {k}" for k in sorted(set(ta) ^ set(tb))]
    found += [f"tensor differs: {k}" for k in sorted(set(ta) & set(tb)) if not torch.equal(ta[k], tb[k])]
    for name in ("table.json", "rounds.jsonl"):
        na, nb = json_numbers(a / name), json_numbers(b / name)
        found += [f"{name}{k}: {na.get(k)} vs {nb.get(k)}" for k in sorted(set(na) | set(nb)) if na.get(k) != nb.get(k)]
    print(f"{len(set(ta) & set(tb))} tensors, {len(json_numbers(a / 'table.json'))} table numbers compared")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args(argv)
    found = differences(args.a, args.b)
    for line in found[:20]:
        print(line)
    print("IDENTICAL" if not found else f"DIFFERENT ({len(found)} differences)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
