"""The configuration schema's sections of where and how a run runs, beside the method's own
(shared/runtime/schema.py, which puts them all into Config): the federation and its server optimizer,
privacy (DP, the mixtures, canaries), the simulation engine, the output directory and fault injection.
Same conventions as there: a field's default is the default, its comment says what it is, the
section's @rules which values are refused.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from shared.runtime.rules import DECAY, FRACTION, POSITIVE, Rule, at_least, one_of, rules


def _list(*items):
    return field(default_factory=lambda: list(items))


SERVER_KEYS = ("server_opt", "server_lr", "server_momentum", "beta_1", "beta_2", "tau")


@rules(users_per_client=at_least(1), chains=at_least(1), clients_per_round=at_least(1), fraction_train=FRACTION,
       sampling=one_of("shuffle", "poisson"),
       server_opt=one_of("fedavg", "fedavgm", "fedadam", "fedyogi"), server_lr=POSITIVE, server_momentum=DECAY,
       beta_1=DECAY, beta_2=DECAY, tau=POSITIVE, min_available_clients=at_least(1), timeout_s=POSITIVE,
       max_examples=at_least(1), norm_bound=POSITIVE, min_replies=at_least(1),
       aggregation=one_of("mean", "median", "trimmed_mean", "krum"),
       trim_beta=Rule(lambda v: 0 <= v < 0.5, "in [0, 0.5)"), krum_faulty=at_least(0))
@dataclass
class Federation:
    users_per_client: int = 1              # 1 = cross-device (one SuperNode per user); >1 = cross-silo
    # a round's clients in C chains run in parallel, one after another inside a chain;
    # null = one chain per client (FedAvg's parallel round), 1 = sequential (cyclic)
    chains: Optional[int] = None
    clients_per_round: Optional[int] = None  # clients sampled per round (seeded); null = fraction_train of the nodes
    fraction_train: float = 1.0            # share of the nodes a round samples when clients_per_round is null
    # shuffle: exactly that many clients, a seeded shuffle (no amplification claimed); poisson: each client
    # joins a round alone with probability q = (that many) / clients, drawn secretly under privacy.dp
    # (server/strategies/chains.py, docs/decisions.md "Privacy")
    sampling: str = "shuffle"
    # the server optimizer (Flower's) on the round's averaged update: fedavg | fedavgm | fedadam | fedyogi
    server_opt: str = "fedavg"
    server_lr: float = 1.0                 # fedavg(m): start + lr * (average - start); fedadam / fedyogi: eta
    server_momentum: float = 0.0           # fedavgm
    beta_1: float = 0.9                    # fedadam / fedyogi
    beta_2: float = 0.99                   # fedadam / fedyogi
    tau: float = 1.0e-3                    # fedadam / fedyogi: adaptivity
    min_available_clients: int = 1         # the server waits for this many nodes before starting
    timeout_s: int = 3600                  # how long the server waits for a round's replies
    audit_replies: bool = False            # clients write what each reply carries to <run dir>/wire/ (docs/formats.md)
    # what the server accepts of a reply (server/validation.py; a reply over a bound is dropped and named):
    # the most examples one reply may claim, so that weight cannot be bought; null = `proper sim` sets it
    # from the data (the most training items one client holds), a deployment declares it (else no cap)
    max_examples: Optional[int] = None
    norm_bound: Optional[float] = None     # an update over this x the step's median update norm is dropped; null = off
    min_replies: int = 1                   # a training step with fewer valid replies stops the run (clear error)
    # the round's replies made one (server/strategies/robust.py): mean | median | trimmed_mean | krum
    aggregation: str = "mean"
    trim_beta: float = 0.2                 # trimmed_mean: share of the weight cut at each end, per coordinate
    krum_faulty: int = 1                   # krum: the faulty replies a round is assumed to hold


@rules(noise_multiplier=at_least(0), clip=POSITIVE, clipping=one_of("server", "client"),
       delta=Rule(lambda v: 0 < v < 1, "in (0, 1)"))
@dataclass
class Dp:
    """privacy.dp: client-level differential privacy of the shared stages (server/strategies/privacy.py,
    docs/decisions.md "Privacy"). Off while noise_multiplier is null."""
    noise_multiplier: Optional[float] = None  # z: noise std z * clip / (updates averaged); null = no DP
    clip: Optional[float] = None           # C: L2 norm each client's (a chain's) update is clipped to
    clipping: str = "server"               # server: the server clips each reply | client: Flower's fixedclipping_mod
    delta: Optional[float] = None          # the accountant's delta; null = 1 / number of users
    seed: Optional[int] = None             # seeds the noise (reproducible studies, tests); null = fresh noise


@rules(users=at_least(0), repeats=at_least(1), digits=at_least(1), candidates=at_least(1))
@dataclass
class Canaries:
    """privacy.canaries: secret-sharer canaries put into chosen users' training items on their own
    client, for `proper audit` (shared/data/canaries.py, docs/decisions.md "Privacy"). Off at 0 users."""
    users: int = 0                         # users who get a canary (the seeded choice); 0 = no canaries
    repeats: int = 10                      # times the canary item is repeated in that user's history
    digits: int = 4                        # the secret: this many random digits (10^digits candidates)
    seed: int = 0                          # seeds the choice of users and the canaries
    candidates: int = 255                  # proper audit: candidates sampled per canary (all where fewer exist)


@rules(mixtures=one_of("share", "noise", "local"), mixture_noise=at_least(0))
@dataclass
class Privacy:
    dp: Dp = field(default_factory=Dp)
    mixtures: str = "share"                # the group stage's mixtures: share | noise (std mixture_noise) | local
    mixture_noise: float = 0.1             # privacy.mixtures=noise: std of the noise added to each sent mixture value
    canaries: Canaries = field(default_factory=Canaries)


@dataclass
class Output:
    dir: str = "runs"                      # run directories go under this
    name: Optional[str] = None             # the run directory's name; null = <command>-<config>-<timestamp>


@rules(slow_seconds=at_least(0), attack=one_of("nan", "scale", "sign_flip", "claim_examples", "shape"))
@dataclass
class Debug:
    """Fault injection, for the tests of a federation that goes on without a node and of --resume."""
    crash_after: Optional[str] = None      # the server stops right after this step (e.g. group:1)
    fail_partitions: List[int] = _list()   # these partitions' clients raise in fail_stages
    fail_stages: List[str] = _list()
    slow_partitions: List[int] = _list()   # these partitions' clients stall slow_seconds in slow_stages
    slow_stages: List[str] = _list()
    slow_seconds: float = 10.0
    record_nodes: bool = False             # simulated clients note the Ray node they ran on (<run dir>/ray_nodes/)
    # hostile clients (client/hostile.py): these partitions corrupt their population and group replies
    attack_partitions: List[int] = _list()
    attack: Optional[str] = None           # nan | scale | sign_flip | claim_examples | shape
    attack_scale: float = 100.0            # scale: the update is sent this many times over


@rules(engine=one_of("ray", "inprocess"), client_cpus=POSITIVE, client_gpus=at_least(0), ray_cpus=at_least(1),
       virtual_clients=at_least(1), clients_per_message=at_least(1), num_clients=at_least(1))
@dataclass
class Simulation:
    """`proper sim`'s engine and Ray resources (docs/deployment.md)."""
    engine: str = "ray"                    # ray (Flower's simulation engine) | inprocess (sim/inprocess.py: no Ray)
    client_cpus: Optional[float] = None    # CPUs per simulated ClientApp; null = 1 (all of Ray's with chains=1)
    client_gpus: float = 0.0               # GPU share Ray reserves per ClientApp (0.25: four per GPU); 0 = the CPU
    ray_cpus: Optional[int] = None         # CPUs Ray may use; null = all; ignored with RAY_ADDRESS
    # M: this many SuperNodes serve the run's clients as virtual clients, each still one client to the
    # server (shared/runtime/virtual.py, docs/decisions.md "Virtual clients"); null = one SuperNode per client
    virtual_clients: Optional[int] = None
    clients_per_message: int = 64          # virtual clients: most clients one message to a SuperNode carries
    num_clients: Optional[int] = None      # written by `proper sim` (the run's clients); not set by hand
