"""A SuperNode that serves virtual clients (simulation.virtual_clients; shared/runtime/virtual.py).

A bundle names the virtual clients it carries; this mod answers each one alone: the handlers (and
the mods inside this one: the reply audit, privacy.dp's client-side clipping) run once per virtual
client, with that client's own records and a Context that is that client's: its partition (so its
users, its state directory <run dir>/clients/<partition>, its seed), its id as node id. The
replies go back packed, each under its index in the bundle; a virtual client that raises is
reported as failed on its own, as a one-user SuperNode would be.

Evaluation is the one place where the clients of a bundle share work: their users' queries are
predicted together, in the batches one client holding all of them would use, before each virtual
client's own evaluate runs on its users' predictions (client/predict.py reads them from the process
cache, shared/runtime/process.py, while the bundle is answered). The replies
are still one per virtual client, computed from its users alone.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from client.data import all_users, users_of_partition
from client.runtime import simulated_state_dir
from client.store import RoutedStore
from client.trainer import ClientTrainer
from shared.method.signature_start import refuse_in_federation
from shared.runtime import protocol as P
from shared.runtime.persist import UserStore
from shared.runtime.process import PROCESS
from shared.runtime.runconfig import run_config_from_context
from shared.runtime.virtual import ERROR, VIRTUAL, client_ids, packed_name, unpacked_name

log = logging.getLogger("proper.client")


def virtual_clients_mod(msg: Message, context: Context, call_next) -> Message:
    bundle = msg.content.config_records.get(VIRTUAL)
    if bundle is None:  # a SuperNode that is one client
        return call_next(msg, context)
    parts, n = [int(p) for p in bundle["partitions"]], int(bundle["num-partitions"])
    contents = bundle_contents(msg.content, len(parts), bool(bundle["shared"]))
    sent, out = msg.content, RecordDict()
    preds = prefetch_evaluation(context, parts, n, contents[0]) if len(parts) > 1 and \
        bundle["shared"] and msg.metadata.message_type == P.EVALUATE else {}
    try:
        with prefetched(preds):
            for k, part in enumerate(parts):
                msg.content = contents[k]
                reply = _answer(msg, context, call_next, part, n)
                if reply.has_error():
                    out[packed_name(k, ERROR)] = ConfigRecord({"reason": str(reply.error.reason or reply.error.code)})
                    continue
                for name, record in reply.content.items():
                    out[packed_name(k, name)] = record
    finally:
        msg.content = sent
    return Message(out, reply_to=msg)


def _answer(msg: Message, context: Context, call_next, part: int, n: int) -> Message:
    """The reply of virtual client `part`, as its own SuperNode would give it."""
    own = Context(run_id=context.run_id, node_id=client_ids_of(n)[part],
                  node_config={**context.node_config, "partition-id": part, "num-partitions": n},
                  state=RecordDict(), run_config=context.run_config)
    try:
        return call_next(msg, own)
    except Exception as e:  # as Flower's runner does for a ClientApp that raises: this client failed
        log.debug("virtual client %d failed", part, exc_info=True)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)


def client_ids_of(n: int) -> list[int]:
    if PROCESS.client_ids is None or PROCESS.client_ids[0] != n:
        PROCESS.client_ids = (n, client_ids(n))
    return PROCESS.client_ids[1]


@contextmanager
def prefetched(preds: dict[tuple[str, str], dict[str, list[str]]]):
    """Predictions made ahead for the users of several virtual clients at once, {(stage, split): {user
    id: predictions}}, in the process cache while the bundle is answered: each virtual client's
    evaluate then reads its users' (client/predict.py)."""
    PROCESS.prefetched = dict(preds)
    try:
        yield
    finally:
        PROCESS.prefetched = {}


def bundle_contents(content: RecordDict, count: int, shared: bool) -> list[RecordDict]:
    """Each virtual client's records: the bundle's own (all but VIRTUAL) when they share them, else
    those packed under its index."""
    if shared:
        own = RecordDict({name: rec for name, rec in content.items() if name != VIRTUAL})
        return [own] * count
    out = [RecordDict() for _ in range(count)]
    for name, record in content.items():
        key = unpacked_name(name)
        if key is not None:
            out[key[0]][key[1]] = record
    return out


def batch_trainer(cfg, run_dir, node_config, parts: list[int], n: int) -> ClientTrainer:
    """One trainer over the users of virtual clients `parts`, each user's private state read from
    its own client's directory: it predicts, it trains nothing."""
    spec, users_all = all_users(cfg)
    refuse_in_federation(cfg, spec)
    per = int(cfg.federation.users_per_client)
    users, stores = [], {}
    for part in parts:
        mine = users_of_partition(users_all, part, n, per)
        store = UserStore(simulated_state_dir(node_config, run_dir, part))
        users += mine
        stores.update({u.user_id: store for u in mine})
    return ClientTrainer(cfg, spec, users, simulated_state_dir(node_config, run_dir, parts[0]),
                         store=RoutedStore(stores))


def prefetch_evaluation(context: Context, parts: list[int], n: int, content: RecordDict) -> dict:
    """{(stage, split): {user id: predictions}} for every user of the bundle, in shared batches;
    {} where evaluation is not PROPER's (MTA) or anything fails (each client then predicts alone,
    and reports its own failure)."""
    conf = content.config_records.get(P.CONFIG, ConfigRecord())
    stage = str(conf.get("stage", "base"))
    if stage.startswith("mta"):
        return {}
    try:
        cfg, run_dir = run_config_from_context(context)
        trainer = batch_trainer(cfg, run_dir, context.node_config, parts, n)
        mean = content.array_records.get(P.MEAN_MIXTURE)
        mean = None if mean is None or not len(mean) else mean.to_torch_state_dict()["mixture"]
        population, group = _arrays(content, P.POPULATION), _arrays(content, P.ARRAYS)
        return {(stage, split): trainer.predictions(stage, population, group, split, mean)
                for split in str(conf.get("splits", "test")).split(",")}
    except Exception:
        log.debug("batched evaluation of %d virtual clients failed; each goes alone", len(parts), exc_info=True)
        return {}


def _arrays(content: RecordDict, name: str):
    rec = content.array_records.get(name)
    return None if rec is None or len(rec) == 0 else rec.to_torch_state_dict()

