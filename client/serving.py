"""Using a finished run where it is kept: a user's full stage-3 model for generation (`proper
generate`), and personalization of users who join after the run (`proper enroll`). No server round.

    from client.serving import Serving
    s = Serving("runs/<run>")                  # or a client's state directory
    s.generate("u0001", ["<prompt>"])          # -> ["<text>"]
    Serving("runs/<run>", data="data/elsewhere")   # where the users' histories are (retrieval.k > 0)
    s.enroll(read_users(s.cfg, "data/new"))    # -> the private files written per user

Where a run's parts are (docs/formats.md):
  a local run directory       config.yaml, population_lora/, group.safetensors; the users' private
                              state in client_state/
  a simulated run directory   the same shared files (exported from the server's checkpoint when the
                              run ends); the users' private state in clients/<n>/, one per SuperNode
  a client's state directory  its users' private state; a deployed client also keeps the run's
                              config.yaml and final shared parts there (written on train.user), a
                              simulated one (<run>/clients/<n>/) uses its run directory's

A run trained with retrieval.k > 0 is served in its training format: each prompt of user U gets U's
top-k training items, ranked by BM25 against the prompt and fitted into the budget exactly as its
evaluation's questions got them (shared/data/retrieval.py Profile, shared/data/encode.py). U's
history is read from the LaMP files (Serving.history): `data` where given (`proper generate
--data`), else the files an enrolled user was enrolled from (its e_u's metadata), else a deployed
client's own files (data_path.txt in its state directory), else the run's data.path; U not in the
files chosen is refused (ServingError), never served without its items. A user whose
profile there is empty gets no items: the prompt goes as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from client.model import build_model
from client.trainer import (
    DATA_PATH,
    expert_embedding,
    get_model,
    initial_embedding,
    load_user_adapter,
    save_user_adapter,
    user_seed,
)
from shared.data.canaries import run_canaries, with_canaries
from shared.data.encode import encode_prompt
from shared.data.lamp import apply_template, load_lamp
from shared.data.retrieval import Profile, with_retrieval
from shared.evaluation.evaluate import MAX_NEW_TOKENS, generate_tokens
from shared.method.model import fingerprint
from shared.method.plan import retrieval_k, starts_at_expert_code
from shared.method.serving import train_embedding
from shared.method.stages import expert_losses, train_user
from shared.runtime.config import read_config, stage_cfg
from shared.runtime.persist import UserStore, import_peft_adapter, load_group, load_tensors
from shared.runtime.precision import use_bf16

# a user's private state, by UserStore kind (the user LoRA is a PEFT directory beside the others)
PRIVATE = {"embedding": "its user embedding e_u (stage 2)", "user": "its user LoRA (stage 3)",
           "router": "its LoRA-aware router (stage 3)"}
SERVED_METHODS = ("proper", "oppu")   # the methods that train a user stage


class ServingError(ValueError):
    """What serving needs is not there (a run's shared parts, a user's private state, a user in the
    data), or a request it refuses; the message names the directory, file or user."""


@dataclass
class RunPlace:
    cfg: DictConfig
    shared: Path                 # config.yaml, population_lora/, group.safetensors
    stores: list[UserStore]      # where users' private state is, searched in order
    home: UserStore | None       # where an enrolled user's private state goes (None: name a client)


def locate(path: str | Path) -> RunPlace:
    """The run's parts seen from a local or simulated run directory, or a client's state directory."""
    p = Path(path)
    if not p.is_dir():
        raise ServingError(f"{p}: no such run or state directory")
    if (p / "client_state").is_dir():           # proper local: one client holding every user
        shared, stores, home = p, [p / "client_state"], p / "client_state"
    elif (p / "clients").is_dir():              # proper sim: each SuperNode's users in their own directory
        shared, stores, home = p, sorted(d for d in (p / "clients").iterdir() if d.is_dir()), None
    else:                                       # a client's state directory: a deployed client's, or <run>/clients/<n>
        shared = p if (p / "population_lora").is_dir() else p.parent.parent
        stores, home = [p], p
    for need in ("config.yaml", "population_lora"):
        if not (shared / need).exists():
            raise ServingError(f"{p}: no {need} in {shared}: not a finished run's directory or a client's state "
                               "directory (a deployed client keeps the shared parts from the run's user stage on)")
    cfg = read_config(shared / "config.yaml")
    if cfg.method not in SERVED_METHODS:
        raise ServingError(f"{shared}: method {cfg.method} trains no user stage; serving and enrollment need "
                           f"one of {', '.join(SERVED_METHODS)}")
    return RunPlace(cfg, shared, [UserStore(s) for s in stores], UserStore(home) if home else None)


def private_path(store: UserStore, user_id: str, kind: str) -> Path:
    """Where the store keeps one kind of a user's private state (the user LoRA: a PEFT directory)."""
    path = store.path(user_id, kind)
    return path.with_suffix("") if kind == "user" else path


def _has(store: UserStore, user_id: str, kind: str) -> bool:
    path = private_path(store, user_id, kind)
    return (path / "adapter_config.json").is_file() if kind == "user" else path.is_file()


def read_users(cfg: DictConfig, data_path: str | Path, user_ids: list[str] | None = None):
    """Users from LaMP files, read as the run read its own (task, held-out items, prompt template, the
    items each query retrieves from the user's own history where the run did: retrieval.k)."""
    spec, users = load_lamp(data_path, task=cfg.data.task, holdout=cfg.data.holdout)
    users = with_retrieval(apply_template(users, spec.name, cfg.data.template), spec, retrieval_k(cfg))
    if not user_ids:
        return users
    by_id = {u.user_id: u for u in users}
    unknown = [uid for uid in user_ids if uid not in by_id]
    if unknown:
        raise ServingError(f"{data_path}: no user {', '.join(map(repr, unknown))} in these files")
    return [by_id[uid] for uid in user_ids]


class Serving:
    """A finished run's shared parts, loaded once (on first use), and its users' models on top."""

    def __init__(self, path: str | Path, exclusive: bool = False, data: str | Path | None = None):
        """exclusive: this Serving builds a backbone of its own instead of using the process's one
        (client/model.py), so nothing else changes it: the population merge keeps no copy of the
        backbone's weights to undo it (a copy of every target weight saved), and the shared parts are
        not checked again before each user. `proper generate` / `proper enroll` serve this way.
        data: the LaMP files holding the served users' histories, where the run retrieves
        (retrieval.k > 0) and they are not in its data.path (module docstring)."""
        self.place = locate(path)
        self.cfg = self.place.cfg
        self.exclusive = exclusive
        self.data = None if data is None else Path(data)
        self.k = retrieval_k(self.cfg)
        self._model = self._tokenizer = None
        self._files: dict[tuple[str, bool], tuple] = {}   # (path, as the run read it) -> (spec, {user id: User})
        self._profiles: dict[str, Profile] = {}

    # ---- the shared parts: population merged, experts and user-aware router loaded
    def _loaded(self):
        """(model, tokenizer), the backbone loaded and the shared parts put in on first use: a refusal
        (a missing run part or user state) comes before that cost."""
        if self._model is None:
            self._model, self._tokenizer = build_model(self.cfg) if self.exclusive else get_model(self.cfg)
            self._load_shared()
        return self._model, self._tokenizer

    @property
    def model(self):
        return self._loaded()[0]

    @property
    def tokenizer(self):
        return self._loaded()[1]

    def _load_shared(self):
        m, shared = self._model, self.place.shared
        import_peft_adapter(m, "population", shared / "population_lora")
        # undoes a merge of another population LoRA first (what an exclusive process never holds)
        m.merge_population(m.part_state("population"), keep=not self.exclusive)
        if (shared / "group.safetensors").is_file():
            load_group(m, shared / "group.safetensors")
        else:  # OPPU: no group stage, the experts stay the seeded no-ops its run had
            m.reset_part("group", seed=self.cfg.seed)
        self._shared_fp = None if self.exclusive else self._fingerprints()

    def _fingerprints(self) -> tuple:
        return self._model.population_fingerprint, fingerprint(self._model.part_state("group"))

    def _check_shared(self):
        """The process holds one backbone (client/model.py get_model): whatever else used it since
        (a client's training, another run's Serving), put this run's shared parts back."""
        if not self.exclusive and self._fingerprints() != self._shared_fp:
            self._load_shared()

    @property
    def has_group(self) -> bool:
        return (self.place.shared / "group.safetensors").is_file()

    # ---- users' private state
    def store_of(self, user_id: str) -> UserStore:
        """The store holding this user's complete private state; refuses, naming what is missing."""
        for store in self.place.stores:
            if any(_has(store, user_id, kind) for kind in PRIVATE):
                missing = [f"{what} ({private_path(store, user_id, kind)})"
                           for kind, what in PRIVATE.items() if not _has(store, user_id, kind)]
                if missing:
                    raise ServingError(f"user {user_id!r}: private state incomplete, missing {'; '.join(missing)}")
                return store
        stores = self.place.stores
        # a simulated run has one store per SuperNode (72 for LaMP-2's sample): name the run, not each one
        where = (str(stores[0].root) if len(stores) == 1 else
                 f"run {self.place.shared} ({len(stores)} client directories)")
        raise ServingError(f"user {user_id!r}: no private state in {where} (missing {', '.join(PRIVATE.values())}): "
                           "not a user held here; a new user is personalized with `proper enroll`")

    def load_user(self, user_id: str) -> torch.Tensor:
        """Put the user's stage-3 model in place (user LoRA, LoRA-aware router); its e_u [d]."""
        store = self.store_of(user_id)
        model = self.model
        self._check_shared()
        load_user_adapter(model, store, user_id)
        model.set_stage("user")
        return store.load(user_id, "embedding")["e_u"].float().to(model.device)

    # ---- a user's history, for the items each prompt retrieves (retrieval.k > 0)
    def _enrolled_from(self, user_id: str) -> Path | None:
        """The LaMP files an enrolled user was personalized on (its e_u's metadata), if it was."""
        for store in self.place.stores:
            path = store.path(user_id, "embedding")
            if path.is_file():
                data = load_tensors(path)[1].get("data")
                return Path(str(data)) if data else None
        return None

    def _users_in(self, path: Path, as_run: bool) -> tuple:
        """(TaskSpec, {user id: User}) of the LaMP files at `path` ({} where there are none), read as
        the run read its users (as_run: data.*, and the canary items its clients added to their users'
        histories) or as `proper enroll` reads new ones (read_users)."""
        key = (str(path), as_run)
        if key not in self._files:
            if not ((path / "questions.json").is_file() and (path / "outputs.json").is_file()):
                self._files[key] = (None, {})
                return self._files[key]
            if as_run:
                from client.data import load_users
                spec, users = load_users(self.cfg, str(path))
                users = with_canaries(users, run_canaries(self.cfg, users))
            else:
                spec, users = load_lamp(path, task=self.cfg.data.task, holdout=self.cfg.data.holdout)
                users = apply_template(users, spec.name, self.cfg.data.template)
            self._files[key] = (spec, {u.user_id: u for u in users})
        return self._files[key]

    def history(self, user_id: str) -> tuple:
        """(TaskSpec, the user as its files hold it: its training items are the history its queries
        retrieve from), from `data` where given, else the files it was enrolled from, else a deployed
        client's own files (DATA_PATH in its state directory), else the run's data.path; refuses,
        naming the user and where it looked, where that does not hold it."""
        enrolled = self._enrolled_from(user_id)
        deployed = self.place.shared / DATA_PATH
        own = Path(deployed.read_text().strip()) if deployed.is_file() else None
        path = self.data or enrolled or own or Path(str(self.cfg.data.path))
        spec, users = self._users_in(path, as_run=enrolled is None)
        if user_id not in users:
            raise ServingError(f"user {user_id!r}: this run puts the user's top {self.k} history items in each "
                               f"prompt (retrieval.k={self.k}), and no history of the user is in {path}: pass "
                               "--data DIR, the LaMP files (questions.json + outputs.json) holding the user")
        return spec, users[user_id]

    def contexts(self, user_id: str, prompts: list[str]) -> list:
        """Each prompt's retrieved items (shared/data/retrieval.py Retrieved) from the user's own
        training items, as the evaluation's questions got them; None each where the run does not
        retrieve (retrieval.k = 0) or the user has no history."""
        if self.k <= 0:
            return [None] * len(prompts)
        if user_id not in self._profiles:
            spec, user = self.history(user_id)
            self._profiles[user_id] = Profile(user, spec, self.k)
        profile = self._profiles[user_id]
        return [profile.context(p) for p in prompts]

    # ---- generation, by the loop the evaluation uses (shared/evaluation/evaluate.py)
    def generate_tokens(self, user_id: str, prompts: list[str], max_new_tokens: int | None = None,
                        streamer=None, fused: bool = False) -> list[list[int]]:
        """The generated ids per prompt (end and padding included), greedy, in the run's prompt format
        (`<prompt>\\nAnswer:`, after the user's retrieved items where the run retrieves); a streamer
        (HF's put/end) needs one prompt at a time. fused: the faster serving path (ProperModel.fused),
        equal to the evaluation's up to rounding."""
        contexts = self.contexts(user_id, prompts)   # a user without its history: refused before the model loads
        e_u = self.load_user(user_id)
        return self._generate(prompts, e_u.view(1, -1).expand(len(prompts), -1), max_new_tokens, contexts,
                              streamer=streamer, fused=fused)

    def prompt_ids(self, prompts: list[str], contexts: list | None = None) -> list[list[int]]:
        """The ids generation starts from: each prompt after its retrieved items (None: none), cut to
        train.max_len as the evaluation's prompts are (shared/data/encode.py encode_prompt)."""
        contexts = contexts or [None] * len(prompts)
        max_len = self.cfg.train.max_len
        return [encode_prompt(self.tokenizer, text, max_len, ctx) for text, ctx in zip(prompts, contexts)]

    def _generate(self, prompts: list[str], emb: torch.Tensor, max_new_tokens: int | None,
                  contexts: list | None = None, **kw) -> list[list[int]]:
        ids = self.prompt_ids(prompts, contexts)
        n_new = max_new_tokens or self.cfg.eval.max_new_tokens or MAX_NEW_TOKENS["generation"]
        return generate_tokens(self.model, self.tokenizer, ids, emb, n_new, int(self.cfg.eval.batch_size),
                               use_bf16(self.cfg.train.bf16), **kw)

    def _decode(self, tokens: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def generate(self, user_id: str, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """The user's answers, decoded and stripped as the evaluation's are."""
        return self._decode(self.generate_tokens(user_id, prompts, max_new_tokens))

    def generate_many(self, user_ids: list[str], prompts: list[str],
                      max_new_tokens: int | None = None) -> dict[str, list[str]]:
        """Every user's answers to every prompt, with several users' rows in each batch: each row
        computes with its own user's LoRA, LoRA-aware router and e_u (ProperModel.user_parts)."""
        contexts = [ctx for uid in user_ids for ctx in self.contexts(uid, prompts)]
        parts, embs = [], []
        for uid in user_ids:
            embs.append(self.load_user(uid))
            parts.append(self.model.part_state("user"))
        rows = torch.arange(len(user_ids), device=self.model.device).repeat_interleave(len(prompts))
        with self.model.user_parts(parts):
            tokens = self._generate(prompts * len(user_ids), torch.stack(embs)[rows], max_new_tokens, contexts,
                                    user_rows=rows)
        texts = self._decode(tokens)
        return {uid: texts[i * len(prompts):(i + 1) * len(prompts)] for i, uid in enumerate(user_ids)}

    # ---- users who join after the run
    def _enrollment_start(self, user, group_cfg) -> torch.Tensor:
        """A new user's first e_u, as the run started its users': where the run's users started at their
        expert's code (group.embedding_start=expert with a kept assignment), the code of the expert
        whose answers fit the new user's history best (expert_losses, k forward passes over it: the
        run's assignment by loss, IFCA), so the user-aware router sends it there from the first step;
        otherwise the user's own seeded draw."""
        d = self.model.d_user
        if not (self.has_group and starts_at_expert_code(self.cfg)):
            return initial_embedding(self.cfg.seed, user.user_id, d)
        expert = int(expert_losses(self.model, self.tokenizer, [user], group_cfg).argmin(1)[0])
        return expert_embedding(self.cfg.seed, user.user_id, d, expert)

    def enroll(self, users, data: str | Path | None = None) -> dict[str, list[Path]]:
        """Personalize new users on the frozen shared parts: each one's e_u, then its user LoRA and
        LoRA-aware router (shared/method/serving.py), written beside the run's other users' private
        state and nowhere else. data: the LaMP files the users were read from, kept in their e_u's
        metadata, where serving finds their histories (retrieval.k > 0). Returns the files written
        per user."""
        home = self.place.home
        if home is None:
            raise ServingError(f"{self.place.shared}: a simulated run keeps each SuperNode's users in clients/<n>/; "
                               "name the client directory the new user joins")
        for u in users:
            if not u.train:
                raise ServingError(f"user {u.user_id!r}: no history to personalize on (an empty profile)")
            held = [str(s.root) for s in self.place.stores if any(_has(s, u.user_id, k) for k in PRIVATE)]
            if held:
                raise ServingError(f"user {u.user_id!r}: already has private state in {held[0]}; "
                                   "enroll is for new users")
        self._loaded()
        self._check_shared()
        cfg, written = self.cfg, {}
        group_cfg, user_cfg = stage_cfg(cfg, "group"), stage_cfg(cfg, "user")
        passes = int(cfg.group.rounds) * int(group_cfg.epochs)  # what a user's e_u got in the run
        for u in users:
            seed = user_seed(cfg.seed, u.user_id)
            start = self._enrollment_start(u, group_cfg)
            # without a group stage the experts are no-ops and e_u routes nothing: it stays as it starts
            e_u = train_embedding(self.model, self.tokenizer, u, start, group_cfg, passes, seed) \
                if self.has_group else start
            meta = {"enrolled": "true", **({"data": str(Path(data).resolve())} if data is not None else {})}
            home.save(u.user_id, "embedding", {"e_u": e_u, "e_u_before": start, "round": torch.tensor([0])}, meta)
            train_user(self.model, self.tokenizer, u, e_u, user_cfg, seed=seed)
            save_user_adapter(self.model, home, u.user_id, cfg.model.name)
            written[u.user_id] = [private_path(home, u.user_id, kind) for kind in PRIVATE]
        return written
