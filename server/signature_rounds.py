"""The server's rounds of the signature start, an optional hook of the group stage
(group.assign_start=signature in a federation; the hook and its knobs: shared/method/signature_start.py).

Before the first group round, the server clusters the users by their answer signatures without
seeing one (shared/method/signature_sums.py): every client reads its users' items with the
population model, then KMEANS_ROUNDS rounds of k-means give the kinds of input, then rounds of EM
(EM_RESTARTS starts side by side, until converged or EM_ROUNDS) fit k answer maps, and a last
round sends the best maps, with which each client decides its users' groups and keeps them
(client/signature_replies.py). Every round is one query.signature message per client; the replies are sums
over a client's users, summed again here.
signature_start returns the result (mean, centroids, maps), which the group stage keeps and
checkpoints (its state's "signature"), so a resumed run does not redo the rounds.
"""
from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from server.federation import Federation
from shared.method import signature_sums as S
from shared.method.signature_start import signature_start_of
from shared.runtime import protocol as P

log = logging.getLogger("proper.server")


def _round(fed: Federation, step: str, config: dict, arrays: dict | None = None, population=None) -> list[dict]:
    content = RecordDict({P.CONFIG: ConfigRecord(config)})
    if arrays:
        content[P.ARRAYS] = ArrayRecord({k: v.contiguous() for k, v in arrays.items()})
    if population is not None:
        content[P.POPULATION] = population
    ok = fed.collect(step, [Message(content, dst_node_id=n, message_type=P.QUERY_SIGNATURE) for n in fed.nodes()])
    if not ok:
        raise RuntimeError(f"{step}: no client answered the signature round")
    return [r.content[P.SIGNATURE].to_torch_state_dict() for r in ok if P.SIGNATURE in r.content]


def _summed(replies: list[dict]) -> dict:
    return {key: sum(r[key].double() for r in replies) for key in replies[0]}


def signature_start(fed: Federation, step: str) -> dict | None:
    """Run the signature rounds (before the first group round), where configured: the result to keep
    ({mean, centroids, log_maps, log_prior}), or None where the run does not start from signatures.
    The caller runs it once per run (while it keeps no result)."""
    start = signature_start_of(fed.cfg)
    if fed.method != "proper" or start is None:
        return None
    k, codes, seed, prior = start.k, start.codes, start.seed, start.prior
    stats = _summed(_round(fed, f"{step}/signature-read", {"phase": "read"}, population=fed.arrays("population")))
    S.check_answers(stats)
    mean, centroids = S.first_centroids(stats, codes, seed)
    for i in range(S.KMEANS_ROUNDS):
        stats = _summed(_round(fed, f"{step}/signature-codes-{i + 1}", {"phase": "codes"},
                               {"mean": mean, "centroids": centroids}))
        centroids = S.next_centroids(stats, centroids)
    held = int((stats["count"] > 0).sum())   # codes past the answers with items start random and may stay empty
    kinds = {"mean": mean, "centroids": centroids}
    em = {"phase": "em", "k": k, "restarts": S.EM_RESTARTS, "seed": seed}
    stats = _summed(_round(fed, f"{step}/signature-em-0", em, kinds))
    before, rounds = None, 0
    while rounds < S.EM_ROUNDS:
        log_maps, log_prior = S.em_maps(stats, prior)
        maps = {**kinds, "log_maps": log_maps, "log_prior": log_prior}
        rounds += 1
        stats = _summed(_round(fed, f"{step}/signature-em-{rounds}", em, maps))
        if S.em_converged(before, stats["loglik"]):
            break
        before = stats["loglik"]
    # the replies' log-likelihoods are those of the maps just sent: the best start is ranked, and
    # sent, with the very maps its likelihood was measured under
    best = int(stats["loglik"].argmax())
    chosen = {**kinds, "log_maps": log_maps[best], "log_prior": log_prior[best]}
    _round(fed, f"{step}/signature-assign", {"phase": "assign"}, chosen)
    log.info("%s: signature start: %d kinds of input (k-means, %d rounds; %d of them hold items), %d answer maps "
             "(EM, %d rounds, %d starts; best log-likelihood %.1f); each client keeps its users' groups",
             step, codes, S.KMEANS_ROUNDS, held, k, rounds, S.EM_RESTARTS, float(stats["loglik"][best]))
    return {key: v.float() if v.is_floating_point() else v for key, v in chosen.items()}
