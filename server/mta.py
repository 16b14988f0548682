"""MTA on the federated server: building the meta-LoRA bank and handing it out (docs/decisions.md, "MTA").

  mta:bank  1. query.mta_candidates to the candidate nodes (all, or mta.candidate_nodes sampled with
               the run's seed): each nominates its mta.candidates_per_client longest-history users and
               sends their profile embeddings and history lengths (no ids, no text);
            2. k-means over the candidates' embeddings, the longest history per cluster is an anchor;
            3. train.mta_anchor to the nodes holding anchors ("slots": which of their candidates):
               each returns one LoRA per anchor;
            the bank (anchor LoRAs, anchor embeddings, centre) goes to <run>/mta_bank.safetensors.
  mta:user  train.mta_user with the whole bank to every node: retrieval, fusion and the stacked
            LoRA happen on the client, which replies metrics only (so the server never learns which
            anchors a user is close to).
  eval      "mta_merge" / "mta" evaluations carry the bank as record "bank" (model_content).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from shared.method import mta as M
from shared.method.plan import Step

if TYPE_CHECKING:
    from server.federation import Federation

log = logging.getLogger("proper.server")

BANK_FILE = "mta_bank.safetensors"


def bank_of(fed: Federation) -> M.Bank | None:
    """The run's bank: in memory, or from its file after a resume."""
    bank = fed.parts.bank
    path = fed.run_dir.path / BANK_FILE
    if bank is None and path.exists():
        bank = fed.parts.bank = M.Bank.load(path)
    return bank


def bank_record(fed: Federation) -> ArrayRecord:
    bank = bank_of(fed)
    return ArrayRecord(bank.to_tensors()) if bank is not None else ArrayRecord()


def mta_step(fed: Federation, step: Step):
    if step.arg == "bank":
        return build_bank(fed, step.name)
    if step.arg == "user":
        return personalize(fed, step.name)
    raise ValueError(f"unknown MTA step {step!r}")


def _participation(fed: Federation, step):
    return {f"nodes_{k}": v for k, v in fed.progress.participation[step].items()}


def build_bank(fed: Federation, step: str):
    mcfg = M.mta_cfg(fed.cfg)
    nodes = sorted(fed.grid.get_node_ids())
    if mcfg.candidate_nodes and int(mcfg.candidate_nodes) < len(nodes):
        rng = np.random.default_rng(int(fed.cfg.seed))
        nodes = sorted(int(n) for n in rng.choice(nodes, int(mcfg.candidate_nodes), replace=False))
    ask = RecordDict({"config": ConfigRecord({"n": int(mcfg.candidates_per_client)})})
    msgs = [Message(ask, dst_node_id=n, message_type="query.mta_candidates") for n in nodes]
    replies = fed.collect(f"{step}/candidates", msgs)
    emb, hist, owner, users = [], [], [], 0
    for r in replies:
        c = r.content["candidates"].to_torch_state_dict()
        users += int(r.content["metrics"].get("num-users", 0))
        for slot, (e, h) in enumerate(zip(c["embeddings"], c["history"])):
            emb.append(e.float().numpy())
            hist.append(int(h))
            owner.append((r.metadata.src_node_id, slot))
    if not emb:
        raise RuntimeError("MTA: no node nominated an anchor candidate")
    emb = np.stack(emb)
    n = int(mcfg.anchors or M.default_anchors(users))
    chosen, labels = M.select_anchors(emb, hist, n, seed=int(fed.cfg.seed), center=bool(mcfg.center),
                                      iters=int(mcfg.kmeans_iters))
    by_node: dict[int, list[int]] = {}
    for i in chosen:
        node, slot = owner[i]
        by_node.setdefault(node, []).append(slot)
    msgs = [Message(RecordDict({"config": ConfigRecord({"slots": slots})}), dst_node_id=node,
                    message_type="train.mta_anchor") for node, slots in by_node.items()]
    trained = {}
    for r in fed.collect(f"{step}/anchors", msgs):
        for name, rec in r.content.array_records.items():
            if name.startswith("anchor."):
                trained[(r.metadata.src_node_id, int(name.split(".", 1)[1]))] = rec.to_torch_state_dict()
    keep = [i for i in chosen if owner[i] in trained]
    if not keep:
        raise RuntimeError("MTA: no anchor LoRA came back")
    if len(keep) < len(chosen):
        log.warning("%s: %d of %d anchor LoRAs came back; the bank holds those", step, len(keep), len(chosen))
    anchors = emb[keep]
    bank = M.Bank([trained[owner[i]] for i in keep], anchors, M.build_center(anchors, bool(mcfg.center)),
                  [hist[i] for i in keep])
    bank.save(fed.run_dir.path / BANK_FILE)
    fed.parts.bank = bank
    fed.run_dir.log({"kind": "train", "stage": "mta_bank", "round": 1, "anchors": len(keep),
                     "candidates": len(emb), "cluster_sizes": np.bincount(labels).tolist(),
                     "bank_bytes": bank.nbytes(), **_participation(fed, f"{step}/anchors")})
    log.info("%s: %d anchors from %d candidates of %d users; bank %.1f MB", step, len(keep), len(emb), users,
             bank.nbytes() / 1e6)


def personalize(fed: Federation, step: str):
    bank = bank_of(fed)
    if bank is None:
        raise RuntimeError("mta:user without a bank: mta:bank failed or did not run")
    ok = fed.send(step, "train.mta_user", RecordDict({"bank": bank_record(fed)}), nodes=fed.eval_nodes())
    losses = [float(r.content["metrics"]["train_loss"]) for r in ok]
    fed.run_dir.log({"kind": "train", "stage": "mta_user", "round": 1,
                     "train_loss": float(np.mean(losses)) if losses else None, **_participation(fed, step)})
