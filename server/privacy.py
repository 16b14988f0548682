"""What a run's privacy.dp guarantees: (epsilon, delta) per stage and composed over the run, from
Flower's RDP accountant (flwr.supercore.privacy_accounting, on Google's dp-accounting), written to
rounds.jsonl ({"kind": "privacy"}) and as a note under the per-stage table.

Each population or group round under DP is one Gaussian release (server/strategies/privacy.py):
the clipped updates averaged, noise of std z * C / n. The server records each release
(note_release, into the checkpointed progress); privacy_note composes them at the end.

- Unit: a clipped update that holds one user's data alone (one user per SuperNode, no chains longer
  than one client) protects that user against adding or removing its data: noise multiplier z.
  When it holds others' data too (users_per_client > 1, or a chain whose clients trained one after
  another), one user's data changes it within the ball of radius C, but it stays in the sum: that
  is replacing the user's data, sensitivity 2C, so the user's epsilon is counted at z / 2 (the same
  Gaussian mechanism for adding or removing at half the noise multiplier).
- Sampling, federation.sampling=shuffle (the default): the round's clients are a seeded shuffle
  (server/strategies/chains.py), reproducible by anyone who knows the run's seed, so no
  amplification by sampling is claimed: every round counts as a full release, for every user (an
  upper bound: a user not sampled in a round risks nothing there).
- Sampling, federation.sampling=poisson: each client joins a round alone with probability
  q = m / N (m = clients_per_round or fraction_train of the N clients), drawn from the operating
  system's entropy under DP; the mean of the clipped updates has the fixed denominator m
  (server/strategies/privacy.py). Each round is one Poisson-subsampled Gaussian release, add or
  remove one user (SamplingMethod.POISSON in Flower's accountant; the config refuses chains and
  several users per client with it), counted for every round of the stage, an empty sample's
  included. The guarantee assumes the adversary (whoever sees the released parameters) does not
  learn who was sampled: a client knows only its own participation, the run records only counts.
- delta: privacy.dp.delta, else 1 / (number of users), the users the evaluations counted.
"""
from __future__ import annotations

import logging
import math

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server.federation import ray_simulation
from server.strategies import dp_settings, needs_start
from server.strategies.chains import expected_clients, round_nodes, split_chains
from shared.method.plan import METHODS, initial_pool
from shared.runtime import protocol as P
from shared.runtime.releases import protection_of, release_table, unaccounted

STAGES = ("population", "group")


def epsilon(releases: list[tuple[float, int]], delta: float, orders: tuple[float, ...] | None = None) -> float:
    """epsilon at delta of the composition of Gaussian releases [(noise multiplier, how many)], with
    no amplification by sampling. inf where any noise multiplier is 0 (clipping without noise)."""
    return epsilon_sampled([(z, count, 1, 1) for z, count in releases], delta, orders, poisson=False)


def epsilon_sampled(releases: list[tuple[float, int, int, int]], delta: float,
                    orders: tuple[float, ...] | None = None, poisson: bool = True) -> float:
    """epsilon at delta of the composition of Poisson-subsampled Gaussian releases [(noise multiplier,
    how many, m, N)], each with sampling rate q = m / N, add or remove one (Flower's RdpAccountant,
    SamplingMethod.POISSON: Mironov, Talwar and Zhang, 2019, through Google's dp-accounting).
    Flower's events state q as sample_size / population_size with one population per accountant:
    releases over different N are put on their least common multiple, q exactly as given."""
    if not releases:
        return 0.0
    if any(z <= 0 for z, *_ in releases):
        return math.inf
    population = math.lcm(*(int(n) for *_, n in releases))
    config = PrivacyConfig(target_delta=delta, population_size=population,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.POISSON if poisson else SamplingMethod.NO_AMPLIFICATION)
    # dp-accounting warns (absl) for each fractional order below 2 whose series does not converge at a
    # large q and leaves that order out: the minimum over the other orders is still an upper bound
    absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl.setLevel(logging.ERROR)
    try:
        acc = RdpAccountant(config, orders=orders)
        for z, count, m, n in releases:
            acc.compose(GaussianPrivacyEvent(noise_multiplier=float(z), sample_size=int(m) * (population // int(n)),
                                             population_size=population), int(count))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def noise_for(target: float, rounds: int, expected: int, population: int, delta: float) -> float:
    """The smallest noise multiplier z (to 0.1 %) whose `rounds` Poisson-sampled releases at q =
    expected / population stay within epsilon `target` at `delta`: for planning a study."""
    lo, hi = 1e-3, 1e3
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if epsilon_sampled([(mid, rounds, expected, population)], delta) > target else (lo, mid)
    return hi


def note_release(fed, stage: str, server_round: int, updates: int):
    """Record one noised release of `stage` (a round that aggregated `updates` clipped updates)."""
    cfg = fed.cfg
    nodes = round_nodes(fed, stage, server_round)
    longest_chain = max((len(c) for c in split_chains(nodes, cfg.federation.chains)), default=1) if nodes else 1
    shared = int(cfg.federation.users_per_client) > 1 or longest_chain > 1
    rounds = fed.progress.privacy.setdefault(stage, [])
    rounds[:] = [r for r in rounds if r["round"] != server_round]   # a redone round counts once
    record = {"round": server_round, "updates": int(updates), "shared": bool(shared)}
    if str(cfg.federation.sampling) == "poisson":   # q = expected / population, the accountant's sampling rate
        population = len(fed.nodes())
        record.update(sampling="poisson", expected=expected_clients(cfg, population), population=population)
    rounds.append(record)


def users_counted(fed) -> int:
    """N of delta = 1 / N: the users evaluated (every user), or with eval.clients (a sample evaluated)
    every node's users, which a sample's count would understate (a larger delta, a smaller epsilon)."""
    if fed.cfg.eval.clients is not None:
        return fed.users_in_federation()
    evals = [p["users"] for p in fed.progress.evaluations()]
    return max(evals or [p["users"] for p in fed.progress.participation.values()] or [0])


def mixture_releases(cfg, layers: int) -> dict:
    """privacy.mixtures: what the group stage's shared mixtures cost.

    share: sent as computed, no guarantee. local: never sent. noise: each sent [L, k] mixture has
    Gaussian noise of std sigma (privacy.mixture_noise) on every value. A mixture is L probability
    rows, each within L2 distance sqrt(2) of any other, so replacing a user's data moves its
    mixture by at most sqrt(2 L) in L2: a Gaussian mechanism with noise multiplier sigma / sqrt(2 L)
    for replacing one user, released once per group round and once more for the first pool
    (group.initial_pool), counted for every user (no amplification, as for privacy.dp)."""
    how = str(cfg.privacy.mixtures)
    if how != "noise" or str(cfg.method) != "proper":
        return {"mixtures": how}
    sigma = float(cfg.privacy.mixture_noise)
    releases = int(cfg.group.rounds) + (1 if initial_pool(cfg) else 0)
    return {"mixtures": how, "std": sigma, "layers": int(layers), "sensitivity": math.sqrt(2 * layers),
            "noise_multiplier": sigma / math.sqrt(2 * layers), "releases": releases}


def privacy_summary(fed) -> dict:
    """{"dp": False} or the DP settings, delta, and epsilon per stage and composed; with
    privacy.mixtures=noise also the mixtures' epsilon (replace-one) and everything composed
    under replace-one."""
    dp = dp_settings(fed.cfg)
    pool = fed.parts.group.mixtures
    layers = int(pool.shape[1]) if pool is not None and pool.dim() == 3 else 0
    mix = mixture_releases(fed.cfg, layers)
    if "noise_multiplier" in mix:
        delta = float(dp.delta) if dp is not None and dp.delta is not None else \
            1.0 / max(2, users_counted(fed))
        mix["epsilon"] = epsilon([(mix["noise_multiplier"], mix["releases"])], delta) if layers else math.nan
    if dp is None:   # privacy.mixtures at its default: the record is as it was before the option
        return {"dp": False} if mix["mixtures"] == "share" else {"dp": False, "mixtures": mix}
    z, recorded = float(dp.noise_multiplier), fed.progress.privacy
    delta = float(dp.delta) if dp.delta is not None else 1.0 / max(2, users_counted(fed))
    out = {"dp": True, "noise_multiplier": z, "clip": float(dp.clip), "clipping": str(dp.clipping),
           "delta": delta, "stages": {}}
    releases = []
    sampled = any(r.get("sampling") == "poisson" for stage in STAGES for r in recorded.get(stage, []))

    def account(rs):   # a round without sampling is a Poisson release at q = 1 / 1: the Gaussian mechanism's
        return epsilon_sampled(rs, delta) if sampled else epsilon([(zr, count) for zr, count, _, _ in rs], delta)
    for stage in STAGES:
        rounds = recorded.get(stage, [])
        if not rounds:
            continue
        shared = any(r["shared"] for r in rounds)
        stage_releases = [(z / 2 if r["shared"] else z, 1, r.get("expected", 1), r.get("population", 1))
                          for r in rounds]
        releases += stage_releases
        out["stages"][stage] = {"rounds": len(rounds), "epsilon": account(stage_releases),
                                "unit": "a user sharing a clipped update (replace-one: z / 2)" if shared
                                else "one user per clipped update (add or remove: z)"}
        poisson = [r for r in rounds if r.get("sampling") == "poisson"]
        if poisson:
            out["stages"][stage]["sampling"] = {"method": "poisson", "expected": poisson[-1]["expected"],
                                                "population": poisson[-1]["population"],
                                                "q": poisson[-1]["expected"] / poisson[-1]["population"]}
    out["epsilon"] = account(releases)
    out["unaccounted"] = [f"{r.message} {r.record}/{','.join(r.keys)}" for r in
                          unaccounted(fed.cfg, messages_of(fed.cfg))]   # shared/runtime/releases.py
    if sampled:
        out["sampling"] = "poisson"
    if mix["mixtures"] != "share":
        out["mixtures"] = mix
    if "noise_multiplier" in mix and layers and not sampled:   # replace-one throughout: DP releases at z / 2
        dp_rounds = sum(len(recorded.get(stage, [])) for stage in STAGES)
        out["epsilon_with_mixtures"] = epsilon([(z / 2, dp_rounds), (mix["noise_multiplier"], mix["releases"])],
                                               delta)
    return out


def messages_of(cfg) -> tuple[str, ...]:
    """The message types a run of `cfg` sends (proper and the baselines; MTA is refused with DP)."""
    out, stages = [], METHODS.get(str(cfg.method), ())
    if "population" in stages and int(cfg.population.rounds) > 0:
        out.append(P.TRAIN_POPULATION)
    if "group" in stages and int(cfg.group.rounds) > 0:
        out.append(P.TRAIN_GROUP)
        if initial_pool(cfg) and str(cfg.privacy.mixtures) != "local":
            out.append(P.QUERY_MIXTURES)
        if str(cfg.group.assign_start) == "signature":
            out.append(P.QUERY_SIGNATURE)
    if "user" in stages:
        out.append(P.TRAIN_USER)
    if any(needs_start(cfg, stage) for stage in STAGES):
        out.append(P.QUERY_INIT)
    if ray_simulation(cfg):   # a Ray run's nodes say their partition (Federation.nodes)
        out.append(P.QUERY_PARTITION)
    return (*out, P.EVALUATE)


def release_note(cfg) -> str:
    """Under privacy.dp: what the epsilon does not cover, by name, and the run's release table
    (shared/runtime/releases.py)."""
    messages = messages_of(cfg)
    left = unaccounted(cfg, messages)
    names = "; ".join(f"{r.message} {r.record}/{','.join(r.keys)} ({protection_of(r, cfg)})" for r in left)
    return (f"releases not covered by the epsilon above ({len(left)}): {names}. Every record a client sends "
            f"in this run, and its protection:\n\n{release_table(cfg, messages)}\n")


def _eps(value: float) -> str:
    return "inf (clipping without noise)" if math.isinf(value) else f"{value:.3g}"


def privacy_note(fed) -> str:
    """The table's privacy line; also written to rounds.jsonl."""
    summary = privacy_summary(fed)
    fed.run_dir.log({"kind": "privacy", "stage": "run", **summary})
    mix = summary.get("mixtures", {"mixtures": "share"})
    if mix["mixtures"] == "noise":
        eps = mix.get("epsilon", math.nan)
        mix_note = (f"; the group stage's mixtures noised (std {mix['std']:g}, noise multiplier "
                    f"{mix['noise_multiplier']:.3g} for replacing a user, {mix['releases']} release(s)): epsilon "
                    f"{_eps(eps)} for them alone (replace-one)")
        if "epsilon_with_mixtures" in summary:
            mix_note += f", {_eps(summary['epsilon_with_mixtures'])} composed with the DP stages (replace-one)"
        mix_note += (", counting each user's own mixture only (its data also moves the mixtures of users trained "
                     "after it: docs/decisions.md)")
    elif mix["mixtures"] == "local":
        mix_note = "; the group stage's mixtures never leave the clients (privacy.mixtures=local)"
    else:
        mix_note = ""
    if fed.cfg.privacy.dp.seed is not None and \
            (summary["dp"] or mix["mixtures"] == "noise"):
        mix_note += ("; the noise is seeded (privacy.dp.seed): anyone with the seed can remove it, so every "
                     "epsilon here is nominal (a study's setting, not a deployment's)")
    if not summary["dp"]:
        return ("privacy: no formal DP (privacy.dp off): the shared parameters are released as trained" + mix_note)
    def sampling(s):
        q = s.get("sampling")
        return f"; Poisson sampling, q = {q['expected']}/{q['population']}" if q else ""
    stages = ", ".join(f"epsilon {_eps(s['epsilon'])} ({name}, {s['rounds']} round(s); {s['unit']}{sampling(s)})"
                       for name, s in summary["stages"].items())
    how = ("amplified by Poisson sampling (secret draws, fixed denominator q N)" if summary.get("sampling")
           else "no amplification by sampling")
    return (f"privacy: client-level DP, clip {summary['clip']:g} ({summary['clipping']} side), noise multiplier "
            f"{summary['noise_multiplier']:g}, RDP accountant, {how}: {stages or 'no release'}; "
            f"composed epsilon {_eps(summary['epsilon'])} at delta {summary['delta']:.3g}{mix_note}; "
            + release_note(fed.cfg))
