"""Virtual clients (simulation.virtual_clients = M): M SuperNodes serve the run's N clients, each
client still one Flower client to the server: its own id, its own message, its own reply.

Why: Flower's in-memory dispatch sweeps every SuperNode's queue every 0.1 s and each lookup scans
every stored message, so a simulation with one SuperNode per user grows as N^2 in users
(docs/decisions.md, "Virtual clients"). Here the simulation starts M SuperNodes; the server's grid
(server/virtual_grid.py) shows the N virtual clients, and carries each virtual client's messages to
a SuperNode in a *bundle*: one Flower message naming the virtual clients (this record) and, per
client, its own records. The SuperNode's ClientApp (client/virtual.py) answers each virtual client
alone, as that client (its partition, users, state directory, seed) and packs the replies; the
grid unpacks them into one reply per virtual client. What a virtual client receives and replies is
what a one-user SuperNode receives and replies; a bundle is the simulation's transport only.

This module is the format both sides share: the virtual clients' ids and the bundle's record names.
"""
from __future__ import annotations

import hashlib

VIRTUAL = "virtual"     # a bundle's ConfigRecord: "partitions" (list), "num-partitions", "shared" (0/1)
ERROR = "error"         # a virtual client's failure inside a bundle reply: ConfigRecord {"reason": ...}
SEP = "/"               # a virtual client's records in a bundle: "<index in bundle>/<record name>"


def client_ids(n: int) -> list[int]:
    """Fixed 63-bit ids of clients 0..n-1, in no relation to partition order (as Flower's random
    node ids). The in-process engine names its SuperNodes with the same ids, so a virtual-client
    run and a one-SuperNode-per-client run sample the same clients (server/strategies/chains.py
    samples from the sorted ids)."""
    return [int(hashlib.sha1(f"proper-node-{i}".encode()).hexdigest()[:15], 16) for i in range(n)]


def packed_name(index: int, name: str) -> str:
    return f"{index}{SEP}{name}"


def unpacked_name(name: str) -> tuple[int, str] | None:
    """(index in the bundle, record name) of a packed record name; None for any other record."""
    head, sep, rest = name.partition(SEP)
    return (int(head), rest) if sep and head.isdigit() else None
