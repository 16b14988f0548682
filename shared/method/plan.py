"""Which steps a run takes, by method: one plan for the federated server and `proper local`.

  proper      PROPER: population -> group (user-aware router, constraint loss) -> user (LoRA-aware router)
  population  population LoRA only (FedAvg of one LoRA, as in Flower's LLM fine-tuning examples)
  oppu        OPPU-style: a per-user LoRA trained on top of the population LoRA, no group stage
              (the experts stay at their initial B = 0, so they add nothing)
  loramoe     LoRAMoE: group experts with a token-only router (no user embedding, no constraint loss)
  mta         MTA (Merge-then-Adapt, docs/decisions.md "MTA"): a bank of anchor-user LoRAs, retrieval and
              fusion per user, a stacked small LoRA per user (shared/method/mta.py); no population stage.
              Evaluated as "mta_merge" (merged anchors only) and "mta" (merged + stacked LoRA)
  rag         the LaMP paper's retrieval baseline: nothing trained, the frozen backbone asked with the
              user's top retrieval.k profile items (BM25 on the client) before the question (eval stage
              "rag"; shared/data/retrieval.py, docs/decisions.md "Retrieval")

retrieval.k > 0 puts the user's retrieved items into every trained stage's inputs, at training and
evaluation (as OPPU does), and into what `proper generate` and `proper audit` give such a run; the
bare rows ("base", "base-chat") are always evaluated without them.

The bare backbone is evaluated in the training format ("eval:base") and, with "base-chat" in
eval.stages, asked through its own chat template ("eval:base-chat", the instruct model's zero-shot
way of being asked: the fair bare row of generation tasks).

A step is a `Step`; its name ("population:2", "eval:group", "user", "mta:bank") is how the
checkpoint, rounds.jsonl and the participation record spell it, and `Step.parse` is the one place
that reads a name back.
"""
from __future__ import annotations

from dataclasses import dataclass

TRAINED = ("population", "group", "user")   # the stages whose steps train (and count as client compute)


@dataclass(frozen=True)
class Step:
    """One step of a run. kind: "population" | "group" (a round of a server-coordinated stage),
    "user" (the clients' local stage), "eval" (arg: the stage evaluated), "mta" (arg: "bank" | "user")."""
    kind: str
    arg: str = ""

    @classmethod
    def parse(cls, name: str) -> Step:
        """A step from its name; a sub-step such as "group:1/pool" (a query inside a round) parses
        to its step, "group:1"."""
        kind, _, arg = str(name).split("/")[0].partition(":")
        if kind not in ("population", "group", "user", "eval", "mta"):
            raise ValueError(f"unknown step {name!r}")
        return cls(kind, arg)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    @property
    def round(self) -> int:
        """The round of a population or group step; 1 for the user stage's one round."""
        return int(self.arg) if self.kind in ("population", "group") else 1

    @property
    def trains(self) -> bool:
        return self.kind in TRAINED

    def __str__(self) -> str:
        return self.name


# a method is an ordered list of stages (the keys: the choices of the config key `method`)
METHODS = {"proper": ("population", "group", "user"), "population": ("population",),
           "oppu": ("population", "user"), "loramoe": ("population", "group"), "mta": ("mta",),
           "rag": ("rag",)}
BASE_CHAT = "base-chat"   # the evaluation stage of the bare backbone asked through its chat template
RAG = "rag"               # the evaluation stage of the bare backbone asked with the user's retrieved items
BARE = ("base", BASE_CHAT, RAG)   # the stages evaluated on the bare backbone: no parameters sent
# method=rag's items per query where retrieval.k is null: a few items, as in the LaMP paper's in-prompt
# augmentation, and what a short prompt holds (the items are cut to fit train.max_len; docs/decisions.md)
RAG_K = 4


def retrieval_k(cfg) -> int:
    """Items retrieved per query (retrieval.k): null = RAG_K for method=rag, 0 (off) for the others."""
    k = cfg.retrieval.k
    return int(k) if k is not None else (RAG_K if cfg.method == "rag" else 0)


def rag_chat(cfg, tokenizer=None) -> bool:
    """Whether stage rag asks through the chat template (retrieval.chat; null = yes where the tokenizer
    has one, the training format where it has none, e.g. a user's own base model: on the benchmark's
    dev side the training format left the bare 135M backbone at ROUGE-1 0.0 on the generation draws,
    the chat template 0.25, and above or level on four of the five label sets: docs/results/suite.md)."""
    if cfg.retrieval.chat is None:
        return tokenizer is None or bool(getattr(tokenizer, "chat_template", None))
    return bool(cfg.retrieval.chat)


def retrieves(stage: str) -> bool:
    """Whether a stage's queries carry the retrieved items (where retrieval_k > 0): every stage but
    the bare backbone's plain rows."""
    return stage not in ("base", BASE_CHAT)


def stage_steps(cfg, stage: str) -> list[Step]:
    """A stage's steps: its rounds (the user stage has one), then its evaluation where eval.stages asks
    for it; MTA's two steps are always followed by both of its evaluations."""
    if stage == "mta":
        return [Step("mta", "bank"), Step("mta", "user"), Step("eval", "mta_merge"), Step("eval", "mta")]
    if stage == RAG:
        return [Step("eval", RAG)]
    rounds = [Step("user")] if stage == "user" else [Step(stage, str(r)) for r in range(1, cfg[stage].rounds + 1)]
    return rounds + ([Step("eval", stage)] if stage in cfg.eval.stages else [])


def stage_plan(cfg) -> list[Step]:
    evals = set(cfg.eval.stages)
    plan = [Step("eval", "base")] if "base" in evals else []
    plan += [Step("eval", BASE_CHAT)] if BASE_CHAT in evals else []
    # cfg.method is one of METHODS: the config schema refuses any other (shared/runtime/schema.py)
    return plan + [step for stage in METHODS[cfg.method] for step in stage_steps(cfg, stage)]


def uses_user_router(cfg) -> bool:
    return cfg.method != "loramoe"


def uses_assignment(cfg) -> bool:
    """Whether the group stage assigns each user an expert (group.constraint_form=assign, IFCA-style):
    the assignment is a target for the user-aware router, so a token-only router (LoRAMoE) has none.
    The one test for it: the client's group round (client/group.py), the signature start
    (shared/method/signature_start.py) and the first pool (initial_pool, below) all read it here."""
    return cfg.group.constraint_form == "assign" and uses_user_router(cfg)


def starts_at_expert_code(cfg) -> bool:
    """Whether a user's first e_u is its expert's code (group.embedding_start=expert): only where the
    assignment is kept for the stage (group.reassign=false), so the expert is known at the start and
    the router's user part learns the k codes' directions (client/data.py expert_embedding). A user
    enrolled after such a run starts at the code of the expert that fits its history (client/serving.py)."""
    return uses_assignment(cfg) and not cfg.group.reassign and cfg.group.embedding_start == "expert"


def initial_pool(cfg) -> bool:
    """Whether the clients send a first pool of mixtures before group round 1 (group.initial_pool):
    only where the constraint loss pushes from other users' mixtures. The assign form pulls each
    user to its own expert and reads no pool (shared/method/stages.py, assignment_loss)."""
    return bool(cfg.group.initial_pool) and cfg.method == "proper" and not uses_assignment(cfg)
