"""The server's view of one run: its configuration, run directory, checkpoint, the shared parts
learned so far (typed: server/state.py), and the wire (send a step's messages, hear back, record who
answered).

Every stage's code (server/stages/, server/evaluation.py, server/mta.py) talks to a Federation.
"""
from __future__ import annotations

import hashlib
import logging
import random
import sys
import time

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm import tqdm

from server.checkpoint import Checkpoint
from server.state import Progress, SharedParts
from server.validation import ReplyBounds, screen, update_norm
from shared.method.plan import Step
from shared.runtime import protocol as P
from shared.runtime.config import to_yaml
from shared.runtime.results import RunDir
from shared.runtime.virtual import client_ids

log = logging.getLogger("proper.server")


def content_order(reply: Message) -> str:
    """A key that orders replies by what they carry, not by when they arrived: FedAvg's float
    sums depend on the order of the clients, and a last-bit difference in the population LoRA
    became a visibly different group stage (Adam's first steps are about lr * sign(g)), so two
    identical runs, or a resumed one, disagreed when replies came back in another order."""
    h = hashlib.sha1()
    for name in sorted(reply.content.array_records):
        for key, array in reply.content.array_records[name].items():
            h.update(key.encode())
            h.update(array.data)
    return h.hexdigest()


def ray_simulation(cfg) -> bool:
    """A run of `proper sim` (which writes simulation.num_clients) on Flower's Ray engine, one SuperNode
    per client: its node ids are random each run. Virtual clients carry fixed ids already."""
    sim = cfg.simulation
    return bool(sim.get("num_clients")) and str(sim.engine) == "ray" and not sim.virtual_clients


def ordered_by_partition(ids: list[int], partition_of: dict[int, int]) -> list[int]:
    """Nodes ordered as the in-process engine's ids of their partitions sort (client_ids), so the Ray
    engine, the in-process engine and virtual clients sample and chain the same clients; a node that
    did not say its partition comes after them, by id."""
    fixed = client_ids(1 + max([p for p in partition_of.values() if p >= 0], default=-1))
    def key(n: int):
        p = partition_of.get(n, -1)
        return (0, fixed[p]) if p >= 0 else (1, n)
    return sorted(ids, key=key)


def sent_start(msg: Message) -> bool:
    """Whether a message carried shared parameters (a round's start), not an empty record."""
    return P.ARRAYS in msg.content.array_records and len(msg.content[P.ARRAYS]) > 0


class Federation:
    def __init__(self, grid: Grid, cfg, run_dir):
        self.grid, self.cfg = grid, cfg
        self.run_dir = RunDir(run_dir)
        if not (self.run_dir.path / "config.yaml").exists():
            self.run_dir.write_config(to_yaml(cfg))
        self.ckpt = Checkpoint(run_dir)
        self.progress, self.parts = Progress(), SharedParts()
        loaded = self.ckpt.load()
        if loaded:
            self.progress = Progress.from_json(loaded[0])
            self.parts.restore(loaded[1])
            done = self.progress.done
            log.info("resuming %s after %d steps (%s)", run_dir, len(done), done[-1] if done else "-")
        self.timeout = float(cfg.federation.timeout_s)
        # each round's sampled clients, drawn once in this process (server/strategies/chains.py round_nodes)
        self.round_samples: dict[tuple[str, int], list[int]] = {}
        self.partition_of: dict[int, int] = {}   # Ray simulation: node id -> partition-id (nodes())
        # Without DP: each step's client update norms (the clip norm of a DP study is chosen on these, on
        # a dev draw). Under DP they stay unrecorded: unclipped and unnoised, they would be a release
        # outside the epsilon (docs/results/privacy.md, "Every release").
        self.update_norms: dict[str, list[float]] | None = (
            {} if cfg.privacy.dp.noise_multiplier is None else None)
        f = cfg.federation   # what a reply may claim (server/validation.py)
        self.bounds = ReplyBounds(max_examples=f.max_examples, norm_bound=f.norm_bound,
                                  noised_mixtures=str(cfg.privacy.mixtures) == "noise")
        if f.max_examples is None:   # `proper sim` sets it from the data; a deployment declares it
            log.warning("federation.max_examples is not set: the examples a training reply claims are not capped, "
                        "so one client can buy its weight in the average (set it to the most items a client holds)")

    @property
    def method(self) -> str:
        return str(self.cfg.method)

    def arrays(self, part: str) -> ArrayRecord:
        """A stage's parameters ("population", "group") as a record to send; empty before it trained."""
        parameters = getattr(self.parts, part).parameters
        return ArrayRecord(parameters) if parameters else ArrayRecord()

    def save(self, step: str, seconds: float):
        self.progress.seconds[step] = seconds
        self.progress.done.append(step)
        self.ckpt.save(self.progress.to_json(), self.parts.checkpoint())

    def wait_for_nodes(self, minimum: int, limit_s: float = 600):
        deadline = time.time() + limit_s
        while len(list(self.grid.get_node_ids())) < minimum:
            if time.time() > deadline:
                raise TimeoutError(f"fewer than {minimum} SuperNodes connected after {limit_s} s")
            time.sleep(0.5)

    def nodes(self) -> list[int]:
        """The connected nodes in a stable order, which sampling and chains cut from. On Flower's Ray
        engine node ids are random each run: ordered by id, two runs of one config sampled and chained
        different clients (val 16.0-29.9 % over three runs of the main job's population stage), so
        there a node is ordered by the id the in-process engine gives its partition (ordered_by_partition)."""
        ids = sorted(self.grid.get_node_ids())
        if not self.ray_simulation:
            return ids
        return ordered_by_partition(ids, self._partitions(ids))

    def eval_nodes(self) -> list[int]:
        """The clients evaluated, and trained in stage 3 (local, so in a simulation for its evaluation
        alone): every node, or with eval.clients = n a fixed sample of n. The sample is drawn by
        eval.sample_seed, not the run's seed, from nodes() (a stable order), so every run of a study
        over one federation meets the same users whatever its seed (issue 34's study at scale)."""
        nodes, n = self.nodes(), self.cfg.eval.clients
        if n is None or n >= len(nodes):
            return nodes
        picked = random.Random(int(self.cfg.eval.sample_seed)).sample(range(len(nodes)), int(n))
        return [nodes[i] for i in sorted(picked)]

    def users_in_federation(self) -> int:
        """The users the passes over the training data are counted against: those evaluated, or with
        an evaluated sample the users of every node (clients x users_per_client, the last may hold fewer)."""
        if self.cfg.eval.clients is None:
            return self.progress.users_evaluated()
        return len(self.nodes()) * int(self.cfg.federation.users_per_client)

    @property
    def ray_simulation(self) -> bool:
        return ray_simulation(self.cfg)

    def _partitions(self, ids: list[int]) -> dict[int, int]:
        """Each node's partition-id, asked once per node (query.partition: no data, no model); a node
        that fails or stays silent is not asked again (-1: ordered after the others, by id)."""
        unknown = [n for n in ids if n not in self.partition_of]
        if unknown:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=P.QUERY_PARTITION) for n in unknown]
            replies = self._exchange("partitions", msgs)
            by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}   # ids given on sending
            self.partition_of.update(dict.fromkeys(unknown, -1))
            for r in replies:
                node = by_id.get(r.metadata.reply_to_message_id)
                if node is not None and not r.has_error():
                    self.partition_of[node] = int(r.content[P.METRICS].get(P.PARTITION_ID, -1))
        return self.partition_of

    # ---- sending and hearing back
    def send(self, step: str, message_type: str, content: RecordDict, nodes: list[int] | None = None) -> list[Message]:
        """The same content to every node (or to `nodes`)."""
        return self.collect(step, [Message(content, dst_node_id=n, message_type=message_type)
                                   for n in (self.nodes() if nodes is None else nodes)])

    def collect(self, step: str, msgs: list[Message], accumulate: bool = False) -> list[Message]:
        """Send, wait up to the timeout, record who answered; check every reply against the message it
        answers (server/validation.py: a reply that fails is dropped and named); return the good
        replies in an order fixed by their content. accumulate: add to the step's participation (a
        chained round sends one step's messages in several waves) instead of replacing it."""
        replies = self._exchange(step, msgs)
        # message ids are assigned on sending; a SuperLink-made error carries src_node_id 1
        by_id = {m.metadata.message_id: m for m in msgs}
        answered = {by_id[r.metadata.reply_to_message_id].metadata.dst_node_id for r in replies
                    if r.metadata.reply_to_message_id in by_id}
        silent = [m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in answered]
        failed = 0
        for r in replies:
            if r.has_error():
                failed += 1
                reason = (r.error.reason or "").strip().splitlines()
                log.warning("%s: a node failed: %s", step, reason[-1][:200] if reason else r.error.code)
        pairs = [(by_id[r.metadata.reply_to_message_id], r) for r in replies
                 if not r.has_error() and r.metadata.reply_to_message_id in by_id]
        kept, dropped = screen(pairs, self.bounds)
        if self.update_norms is not None:
            # an update is measured against what was sent: a round that sent no start (plain FedAvg's
            # first: the clients draw it) has none, only the parameters themselves
            kept_ids = {id(r) for r in kept}
            norms = [n for n in (update_norm(s, r) for s, r in pairs
                                 if id(r) in kept_ids and sent_start(s)) if n is not None]
            # a chained round's first wave finds its step out of participation (chained_round resets it)
            fresh = not accumulate or step not in self.progress.participation
            self.update_norms[step] = ([] if fresh else self.update_norms.get(step, [])) + norms
        for node, reason in dropped:
            log.warning("%s: dropped the reply of node %s: %s", step, node, reason)
        ok = sorted(kept, key=content_order)
        if silent:
            log.warning("%s: %d node(s) did not answer within %.0f s", step, len(silent), self.timeout)
        users = int(sum(int(r.content[P.METRICS].get(P.NUM_USERS, 0)) for r in ok))
        counts = {"sent": len(msgs), "ok": len(ok), "failed": failed, "silent": len(silent), "users": users}
        if dropped:   # present only where a reply was dropped: an honest run's record is as it was
            counts["dropped"] = len(dropped)
        seen = (self.progress.participation.get(step) if accumulate else None) or {}
        keys = dict.fromkeys([*counts, *seen])
        self.progress.participation[step] = {k: counts.get(k, 0) + seen.get(k, 0) for k in keys}
        return ok

    def _exchange(self, step: str, msgs: list[Message]) -> list[Message]:
        """Flower's send_and_receive, written as push + pull so that long steps show progress
        (clients answered / asked, elapsed): a bar on a terminal, a log line a minute otherwise."""
        ids = set(self.grid.push_messages(msgs))
        replies, deadline, t0, last = [], time.time() + self.timeout, time.time(), time.time()
        bar = None
        if sys.stderr.isatty() and len(ids) > 1:
            bar = tqdm(total=len(ids), desc=step, unit="client", leave=False)
        while ids and time.time() < deadline:
            got = list(self.grid.pull_messages(ids))
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            replies += got
            if bar is not None:
                bar.update(len(got))
            elif time.time() - last >= 60 and ids:
                last = time.time()
                log.info("%s: %d/%d clients answered (%.0f s)", step, len(replies), len(msgs), last - t0)
            if ids and not got:
                time.sleep(0.1)
        if bar is not None:
            bar.close()
        return replies

    def log_train(self, step: Step, metrics: dict):
        norms = (self.update_norms or {}).get(step.name)
        quantiles = {} if not norms else {
            f"update_norm_p{q}": round(float(np.percentile(norms, q)), 4) for q in (10, 50, 90)}
        self.run_dir.log({"kind": "train", "stage": step.kind, "round": step.round, **metrics, **quantiles,
                          **{f"nodes_{k}": v for k, v in self.progress.participation.get(step.name, {}).items()}})
