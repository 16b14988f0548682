"""Every release: what a client's reply carries to the server, message type by message type, record
by record, and how each is protected (docs/results/privacy.md, "Every release"; docs/decisions.md
"Privacy"). One registry, read by the run's table note under privacy.dp (server/privacy.py) and by
the test that runs tiny federations and fails on a reply record this registry does not list
(tests/test_releases.py).

Who is the adversary: under privacy.dp the server is trusted (server-side clipping sees each update
in the clear; there is no secure aggregation), and what is protected is what leaves the server: the
parameters it sends and writes, the pool of mixtures it passes on to other clients, rounds.jsonl,
the table and the checkpoint. Protection, per record:
  dp               clipped and noised; counted by the accountant (epsilon in the table)
  noised           noised on the client before it leaves (privacy.mixtures=noise; its own epsilon)
  aggregated only  the server keeps each reply's value for the step and releases only a sum, mean or
                   average over the step's replies: no formal bound
  none             written or passed on per reply (pooled without ids at best): no formal bound
  not sent         the record is there, empty
  no user data     computed without any user's data (a seeded starting point, the task's name)
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from shared.runtime import protocol as P

DP, NOISED, AGGREGATED, NONE, NOT_SENT, NO_DATA = \
    "dp", "noised", "aggregated only", "none", "not sent", "no user data"
PROTECTIONS = (DP, NOISED, AGGREGATED, NONE, NOT_SENT, NO_DATA)
TRAIN_METRICS = ("train_loss", "train_tokens", "train_seconds", "tokens_per_s", "constraint_loss", "num_users")


@dataclass(frozen=True)
class Release:
    message: str                 # the message type the reply answers
    record: str                  # the reply's record
    keys: tuple[str, ...]        # the record's keys (fnmatch patterns)
    what: str
    protection: str              # one of PROTECTIONS, or a rule of protection_of


def _rows(message, rows):
    return [Release(message, record, tuple(keys), what, protection) for record, keys, what, protection in rows]


COUNTS = (P.METRICS, (P.NUM_EXAMPLES, P.NUM_USERS), "counts: the reply's training examples, its users",
          AGGREGATED)
REGISTRY: tuple[Release, ...] = tuple([
    *_rows(P.TRAIN_POPULATION, [
        (P.ARRAYS, ("*",), "the population LoRA after the client's training (its update)", "update"),
        COUNTS,
        (P.METRICS, TRAIN_METRICS, "training metrics (loss, tokens, seconds)", AGGREGATED)]),
    *_rows(P.TRAIN_GROUP, [
        (P.ARRAYS, ("*",), "experts and user-aware routers after the client's training (its update)", "update"),
        (P.ROUTING, ("routing_mass",), "routing mass per layer and expert (weighs the expert average)", "mass"),
        (P.ROUTING, ("mixtures",), "the users' mixtures [U, L, k], shuffled, no ids (the pool)", "mixtures"),
        COUNTS,
        (P.METRICS, TRAIN_METRICS, "training metrics (loss, constraint loss, tokens, seconds)", AGGREGATED)]),
    *_rows(P.TRAIN_USER, [
        COUNTS,
        (P.METRICS, TRAIN_METRICS, "stage-3 training metrics (the user LoRAs stay on the client)", AGGREGATED)]),
    *_rows(P.QUERY_INIT, [
        (P.ARRAYS, ("*",), "the seeded starting point of a shared part", NO_DATA),
        (P.METRICS, (P.NUM_USERS,), "the client's user count", AGGREGATED)]),
    *_rows(P.QUERY_MIXTURES, [
        (P.ROUTING, ("mixtures",), "the users' mixtures under the group start (the first pool)", "mixtures"),
        (P.METRICS, (P.NUM_USERS,), "the client's user count", AGGREGATED)]),
    *_rows(P.QUERY_PARTITION, [
        (P.METRICS, (P.PARTITION_ID,), "Ray simulation only: the node's simulated partition (the server orders "
         "nodes by it)", NO_DATA)]),
    *_rows(P.QUERY_SIGNATURE, [
        (P.SIGNATURE, ("sum", "count", "answer_sum", "answer_count"),
         "signature start, read: sums and counts of the users' item readings, per answer too", AGGREGATED),
        (P.SIGNATURE, ("sum", "count", "inertia"),
         "signature start, codes: k-means sums, counts and inertia per centroid", AGGREGATED),
        (P.SIGNATURE, ("counts", "mass", "loglik"),
         "signature start, em: EM sufficient statistics (responsibility-weighted counts, mass, log-likelihood)",
         AGGREGATED),
        (P.METRICS, (P.NUM_USERS,), "the client's user count", AGGREGATED)]),
    *_rows(P.EVALUATE, [
        (P.METRICS, ("*.stat.*",), "evaluation sufficient statistics per split (summed over clients)", AGGREGATED),
        (P.METRICS, ("*.user-scores",), "each user's score, shuffled, no ids (kept pooled in the checkpoint "
                                        "for the bootstrap)", NONE),
        (P.METRICS, (P.NUM_EXAMPLES, P.NUM_USERS, P.NUM_NO_HISTORY), "counts: queries, users, users with no history",
         AGGREGATED),
        (P.INFO, ("task",), "the task's name", NO_DATA)]),
    # method=mta (refused with privacy.dp): its anchors and candidates leave as they are
    *_rows("query.mta_candidates", [
        ("candidates", ("*",), "candidate users' history embeddings", NONE),
        (P.METRICS, (P.NUM_USERS, "num-candidates"), "counts", AGGREGATED)]),
    *_rows("train.mta_anchor", [
        ("anchor.*", ("*",), "an anchor user's LoRA, trained on that user's history alone", NONE),
        (P.METRICS, ("*",), "training metrics and counts", AGGREGATED)]),
    *_rows("train.mta_user", [
        (P.METRICS, ("*",), "training metrics and counts", AGGREGATED)]),
])


def protection_of(release: Release, cfg) -> str:
    """What protects `release` in a run of `cfg`."""
    dp = cfg.privacy.dp.noise_multiplier is not None
    how = str(cfg.privacy.mixtures)
    if release.protection == "update":   # without DP it leaves the server only inside the average
        return DP if dp else AGGREGATED
    if release.protection == "mixtures":
        return {"share": NONE, "noise": NOISED, "local": NOT_SENT}[how]
    if release.protection == "mass":     # under noise / local: the reply's example count for every expert
        return AGGREGATED
    return release.protection


def matches(message: str, record: str, key: str) -> list[Release]:
    """The registry's rows that list `key` of `record` in a reply to `message`."""
    return [r for r in REGISTRY if r.message == message and fnmatch(record, r.record)
            and any(fnmatch(key, k) for k in r.keys)]


def unlisted(message: str, records: dict[str, list[str]]) -> list[str]:
    """"record/key" of a reply (records: {record name: its keys}) that the registry does not list."""
    return [f"{message} {name}/{key}" for name, keys in records.items() for key in keys
            if not matches(message, name, key)]


def release_table(cfg, messages: tuple[str, ...] | None = None) -> str:
    """The registry as a markdown table, with each record's protection in a run of `cfg`."""
    lines = ["| message | record | keys | what | protection |", "|---|---|---|---|---|"]
    for r in REGISTRY:
        if messages is not None and r.message not in messages:
            continue
        lines.append(f"| {r.message} | {r.record} | {', '.join(r.keys)} | {r.what} | {protection_of(r, cfg)} |")
    return "\n".join(lines)


def unaccounted(cfg, messages: tuple[str, ...]) -> list[Release]:
    """The releases of `messages` that carry user data and are not noised: what a DP run's epsilon
    does not cover."""
    return [r for r in REGISTRY if r.message in messages
            and protection_of(r, cfg) not in (DP, NOISED, NOT_SENT, NO_DATA)]
