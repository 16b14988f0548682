"""The server's side of virtual clients (simulation.virtual_clients; shared/runtime/virtual.py): a
Grid that shows the run's N clients and carries their messages to the M SuperNodes in bundles.

Everything above it (Federation, sampling, chains, strategies, privacy, evaluation) sees N
clients, sends each of them its own message and gets back one reply from each, whose src_node_id
is that client's id: the code of a one-SuperNode-per-client run, unchanged. Below it, Flower's
engine holds M SuperNodes and, per step, at most a few bundles per SuperNode: the in-memory
dispatch (every SuperNode swept every 0.1 s, each lookup scanning every stored message) costs
O(M x bundles) per sweep instead of O(N x messages).

A bundle carries at most simulation.clients_per_message clients and is spread so that every
SuperNode gets work: a round's sampled clients are cut into about M bundles; an evaluation or
the user stage (every client) into bundles of clients_per_message.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from shared.runtime.virtual import ERROR, VIRTUAL, client_ids, packed_name, unpacked_name


def virtual_grid(grid: Grid, cfg) -> Grid:
    """`grid` itself, or the virtual clients' view of it where simulation.virtual_clients is set."""
    sim = cfg.simulation
    if not sim.virtual_clients:
        return grid
    if not sim.num_clients:
        raise RuntimeError("simulation.virtual_clients needs simulation.num_clients (proper sim writes it)")
    # as many SuperNodes as sim/run.py starts: never more than there are clients
    supernodes = min(int(sim.virtual_clients), int(sim.num_clients))
    return VirtualGrid(grid, int(sim.num_clients), supernodes, int(sim.clients_per_message))


class VirtualGrid(Grid):
    def __init__(self, grid: Grid, num_clients: int, supernodes: int, per_message: int):
        self.grid, self.num_clients = grid, num_clients
        self.supernodes, self.per_message = supernodes, max(1, per_message)
        self.partition = {cid: i for i, cid in enumerate(client_ids(num_clients))}
        self.bundles: dict[str, list[Message]] = {}   # a bundle's Flower message id -> its clients' messages
        self.bundle_of: dict[str, str] = {}            # a client's message id -> its bundle's
        self.ready: dict[str, Message] = {}            # replies not yet pulled, by the message they answer
        self.turn = 0                                  # the SuperNode the next bundle goes to

    # ---- Grid's interface
    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The N clients, once all M SuperNodes have registered (the server waits for them)."""
        return list(self.partition) if len(list(self.grid.get_node_ids())) >= self.supernodes else []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for m in msgs:  # as Flower's grids do: the id is set on the message the caller holds
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        nodes = sorted(self.grid.get_node_ids())
        known = [m for m in msgs if m.metadata.dst_node_id in self.partition and nodes]
        for m in msgs:
            if m.metadata.dst_node_id not in self.partition or not nodes:
                self.ready[m.metadata.message_id] = Message(
                    Error(ErrorCode.NODE_UNAVAILABLE, f"no client {m.metadata.dst_node_id}"), reply_to=m)
        by_type: dict[str, list[Message]] = {}
        for m in known:
            by_type.setdefault(m.metadata.message_type, []).append(m)
        out: list[tuple[Message, list[Message]]] = []
        for group in by_type.values():
            size = min(self.per_message, math.ceil(len(group) / max(1, len(nodes))))
            for s in range(0, len(group), size):
                out.append((self._bundle(group[s:s + size], nodes[self.turn % len(nodes)]), group[s:s + size]))
                self.turn += 1
        self.grid.push_messages([bundle for bundle, _ in out])
        for bundle, clients in out:   # its Flower message id is set by now
            self.bundles[bundle.metadata.message_id] = clients
            for m in clients:
                self.bundle_of[m.metadata.message_id] = bundle.metadata.message_id
        return [m.metadata.message_id for m in msgs]

    def _bundle(self, msgs: list[Message], node: int) -> Message:
        shared = all(m.content is msgs[0].content for m in msgs)
        content = RecordDict(dict(msgs[0].content.items())) if shared else RecordDict()
        if not shared:
            for k, m in enumerate(msgs):
                for name, record in m.content.items():
                    content[packed_name(k, name)] = record
        content[VIRTUAL] = ConfigRecord({"partitions": [self.partition[m.metadata.dst_node_id] for m in msgs],
                                         "num-partitions": self.num_clients, "shared": int(shared)})
        first = msgs[0].metadata
        return Message(content, dst_node_id=node, message_type=first.message_type, group_id=first.group_id)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        waiting = {self.bundle_of[i] for i in wanted if i in self.bundle_of}
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                self._unpack(reply)
        return [self.ready.pop(i) for i in wanted if i in self.ready]

    def _unpack(self, reply: Message):
        msgs = self.bundles.pop(reply.metadata.reply_to_message_id, [])
        for m in msgs:
            self.bundle_of.pop(m.metadata.message_id, None)
        if reply.has_error():  # the SuperNode failed as a whole: each of its clients failed
            for m in msgs:
                self.ready[m.metadata.message_id] = Message(Error(reply.error.code, reply.error.reason), reply_to=m)
            return
        contents = [RecordDict() for _ in msgs]
        errors: dict[int, str] = {}
        for name, record in reply.content.items():
            key = unpacked_name(name)
            if key is None or key[0] >= len(msgs):
                continue
            if key[1] == ERROR:
                errors[key[0]] = str(record.get("reason", ""))
            else:
                contents[key[0]][key[1]] = record
        for k, m in enumerate(msgs):
            if k in errors or not len(contents[k]):
                reason = errors.get(k, "the SuperNode sent no reply for this client")
                out = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=m)
            else:
                out = Message(contents[k], reply_to=m)
            self.ready[m.metadata.message_id] = out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        out, deadline = [], None if timeout is None else time.time() + timeout
        while ids and (deadline is None or time.time() < deadline):
            got = list(self.pull_messages(ids))
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            out += got
            if ids and not got:
                time.sleep(0.1)
        return out
