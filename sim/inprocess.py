"""`simulation.engine: inprocess`: the same ServerApp and ClientApp, every SuperNode's ClientApp
called in this process, one message at a time, without Ray.

Why: sweeps of the federated optimizer (docs/results/federated.md) need many full federated runs
on 2 CPU cores. Ray gives each client actor one core and a copy of the backbone, and Flower's
in-memory dispatch polls every node; here the backbone is loaded once and a message is a function
call. What the clients compute and what the server does with it are the same code and the same
messages as under Ray (tests/test_federation.py checks the parameters agree), only the transport
differs: the Grid below stands in for Flower's InMemoryGrid.

What it does not give: parallel clients (a round's clients run one after another, so wall time is
the sum of the clients' times) and process isolation (a client that kills the process kills the run).
"""
from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from shared.runtime.virtual import client_ids

log = logging.getLogger("proper.sim")


def node_ids(n: int) -> list[int]:
    """Fixed 63-bit node ids, in no relation to partition order (as Flower's random ids); the ids
    virtual clients get (shared/runtime/virtual.py), so both runs sample the same clients."""
    return client_ids(n)


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1):
        self.client_app, self._run_id = client_app, run_id
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, state=RecordDict(), run_config={},
                                      node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i, nid in enumerate(node_ids(num_nodes))}
        self.queue: dict[str, Message] = {}
        self.replies: dict[str, Message] = {}

    # ---- Grid's interface
    def set_run(self, run_id: int) -> None:
        self._run_id = run_id

    @property
    def run(self):
        return self._run_id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.queue[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Deliver one waiting message (so a caller polling for progress sees it), then hand back
        the replies to any of `message_ids`."""
        wanted = set(message_ids)
        todo = next((i for i in self.queue if i in wanted), None)
        if todo is not None:
            msg = self.queue.pop(todo)
            self.replies[todo] = self._deliver(msg)
        out = [self.replies.pop(i) for i in list(self.replies) if i in wanted]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        out = []
        while ids:
            got = list(self.pull_messages(ids))
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            out += got
        return out

    def _deliver(self, msg: Message) -> Message:
        ctx = self.contexts.get(msg.metadata.dst_node_id)
        if ctx is None:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
        TaskIdentity.node_id = msg.metadata.dst_node_id
        try:
            return self.client_app(msg, ctx)
        except Exception as e:  # as Flower's ClientApp runner: the server gets an error reply
            log.debug("node %s failed", msg.metadata.dst_node_id, exc_info=True)
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"), reply_to=msg)
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_id: int = 1):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_nodes, run_id)
    ctx = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, ctx)
