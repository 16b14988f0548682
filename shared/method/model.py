"""ProperModel: a causal LM whose FFN layers carry the three PROPER adapters.

One object serves every stage: `set_stage()` switches what the layers compute and what trains.
Parameters are exchanged as flat {name: tensor} dicts per part:
  population  lora_A / lora_B of every layer                    (shared, stage 1)
  group       experts, W_h, W_u of every layer                   (shared, stage 2)
  user        user LoRA + LoRA-aware router of every layer        (private, stage 3)
and the user embedding e_u (private, stage 2), kept per user by the caller.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
import torch.nn as nn

from shared.method.adapters import STAGES, ProperLinear, RoutingContext
from shared.runtime.targets import target_linears


class ProperModel(nn.Module):
    def __init__(self, lm: nn.Module, targets: list[str], *, k: int = 5, r_population: int = 8,
                 alpha_population: float = 16, r_group: int = 4, alpha_group: float = 8,
                 r_user: int = 4, alpha_user: float = 8, d_user: int = 128, router_u_init: float = 0.02,
                 tie_user_router: bool = False, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.targets = list(targets)
        self.k, self.d_user = k, d_user
        self.ctx = RoutingContext()
        g = torch.Generator().manual_seed(seed)
        self.layer_names: list[str] = []
        for name, module in target_linears(lm, targets):
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            layer = ProperLinear(module, self.ctx, k=k, r_population=r_population,
                                 alpha_population=alpha_population, r_group=r_group,
                                 alpha_group=alpha_group, r_user=r_user, alpha_user=alpha_user,
                                 d_user=d_user, router_u_init=router_u_init, generator=g)
            layer.index = len(self.layer_names)
            setattr(parent, child, layer)
            self.layer_names.append(name)
        if not self.layer_names:
            raise ValueError(f"no target modules matched {targets}")
        if tie_user_router:
            # one W_u object in every layer: W_u e_u adds the same logits to each layer's router, so
            # "expert e" is the same set of users throughout the model (its gradient sums over the
            # layers). The exchanged state keeps a copy per layer name, all equal.
            shared = self.layers()[0][1].router_u
            for _, layer in self.layers()[1:]:
                layer.router_u = shared
        for p in lm.parameters():
            p.requires_grad_(False)
        self.stage = "base"
        self.population_fingerprint: str | None = None  # which population LoRA W_p was built from

    # ---- structure
    def layers(self) -> list[tuple[str, ProperLinear]]:
        return [(n, self.lm.get_submodule(n)) for n in self.layer_names]

    @property
    def device(self) -> torch.device:
        """Where the model computes (the client's device): batches and users' embeddings go here."""
        return next(self.lm.parameters()).device

    @property
    def merged(self) -> bool:
        return self.layers()[0][1].merged

    def set_stage(self, stage: str, train: bool = False):
        """Switch what the layers compute; with train=True, make exactly that stage's part trainable."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage = stage
        self.clear_cache()
        for p in self.parameters():
            p.requires_grad_(False)
        for _, layer in self.layers():
            layer.stage = stage
            if train and stage != "base":
                for pname in ProperLinear.PARTS[stage]:
                    getattr(layer, pname).requires_grad_(True)
        self.train(train)
        return self

    def clear_cache(self):
        """Drop every layer's kept inference weights (ProperLinear._frozen). Called wherever parameters
        are loaded or the stage changes, to free them: correctness does not depend on it, since an
        entry is keyed on the version and storage of the weights it was built from."""
        for _, layer in self.layers():
            layer.clear_cache()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- parameter exchange
    def part_state(self, part: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers():
            for pname in ProperLinear.PARTS[part]:
                # a copy on the CPU: what goes into a reply or a private file (a copy on the CPU already)
                out[f"{name}.{pname}"] = getattr(layer, pname).detach().to("cpu", copy=True)
        return out

    def check_part_state(self, part: str, state: dict[str, torch.Tensor], source: str = "state") -> dict:
        """{name: parameter} of `part`, once `state` is checked to hold exactly its names and shapes."""
        expected = {f"{n}.{p}": getattr(layer, p) for n, layer in self.layers() for p in ProperLinear.PARTS[part]}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: {part} parameters do not match this model "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
        for key, param in expected.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                 f"this model expects {tuple(param.shape)}")
        return expected

    @torch.no_grad()
    def load_part_state(self, part: str, state: dict[str, torch.Tensor], source: str = "state"):
        """Copy a part's state in. A parameter held by several layers (the tied W_u) gets the mean
        of its copies: they are equal unless the server made them differ (DP noise added to each
        copy, privacy.dp), and the mean of independently noised copies is the less noisy value
        (post-processing: no privacy cost)."""
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        copies: dict[int, tuple[torch.nn.Parameter, list[torch.Tensor]]] = {}
        for key, param in self.check_part_state(part, state, source).items():
            copies.setdefault(id(param), (param, []))[1].append(state[key])
        for param, values in copies.values():
            same = all(torch.equal(v, values[0]) for v in values[1:])
            value = values[0] if same else torch.stack([v.double() for v in values]).mean(0)
            param.copy_(value.to(param.dtype))
        self.clear_cache()

    @torch.no_grad()
    def reset_part(self, part: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _, layer in self.layers():
            getattr(layer, f"reset_{part}")(g)
        self.clear_cache()

    # ---- the population merge, idempotent per population LoRA
    @torch.no_grad()
    def merge_population(self, population_state: dict[str, torch.Tensor] | None = None, keep: bool = True):
        """Fold the population LoRA into the backbone: W_p = W + s B_p A_p.

        Called with a state, it first undoes a merge of a different population LoRA, so a
        long-lived process (a Flower client) can move between runs without reloading the model.
        keep=False: the backbone's W is not kept, so this merge cannot be undone (a process that
        serves one run and nothing else: it saves a copy of the target weights).
        """
        if population_state is not None:
            fp = fingerprint(population_state)
            if self.merged and fp == self.population_fingerprint:
                return
            if self.merged:
                self.unmerge_population()
            self.load_part_state("population", population_state)
        elif self.merged:
            return
        for _, layer in self.layers():
            layer.merge_population(keep)
        self.clear_cache()
        self.population_fingerprint = fingerprint(self.part_state("population"))

    @torch.no_grad()
    def unmerge_population(self):
        for _, layer in self.layers():
            layer.unmerge_population()
        self.clear_cache()
        self.population_fingerprint = None

    # ---- forward with users
    @contextmanager
    def users(self, user_emb: torch.Tensor | None, record: bool = False, rows: torch.Tensor | None = None):
        """Route this forward pass for these users ([B, d] embeddings); optionally record betas.
        rows [B]: in stage 3, row b uses user rows[b] of the parts given to `user_parts`."""
        if rows is not None and self.ctx.user_stack is None:
            raise RuntimeError("rows name users of a multi-user batch: give their parts with user_parts()")
        self.ctx.user_emb, self.ctx.record, self.ctx.betas, self.ctx.user_index = user_emb, record, [], rows
        try:
            yield self.ctx
        finally:
            self.ctx.user_emb, self.ctx.record, self.ctx.user_index = None, False, None

    @contextmanager
    def user_parts(self, states: list[dict[str, torch.Tensor]]):
        """Within: the user parts (part_state("user") of several users) that `users(..., rows=)`
        picks from per row, stacked once per layer, so one batch serves many users' stage-3 models
        (what multi-LoRA serving systems do, for ProperLinear's user LoRA and LoRA-aware router)."""
        names = ProperLinear.PARTS["user"]
        self.ctx.user_stack = [tuple(torch.stack([s[f"{layer}.{p}"] for s in states]).to(self.device) for p in names)
                               for layer in self.layer_names]
        try:
            yield self.ctx
        finally:
            self.ctx.user_stack = None
            self.clear_cache()  # the layers' gathered rows hold the stacks: let them go

    @contextmanager
    def fused(self, on: bool = True):
        """Within: one user's stage-2/3 model is served through ProperLinear's fused path (its parts
        folded into two kept float32 matmuls per layer: faster decoding, outputs equal to the exact
        path's up to rounding). Batches of several users, fixed mixtures and recorded routing keep
        the exact path. The evaluation never fuses (its numbers stay those of the trained model)."""
        before = [vars(layer).get("fuse") for _, layer in self.layers()]   # None: the class's setting
        for _, layer in self.layers():
            layer.fuse = on
        try:
            yield self
        finally:
            for (_, layer), was in zip(self.layers(), before):
                if was is None:
                    del layer.fuse
                else:
                    layer.fuse = was

    @contextmanager
    def fixed_mixture(self, mixture: torch.Tensor | None):
        """Within: every layer mixes its experts with mixture[l] ([L, k]) instead of its router, for
        every row and token (a user with no history, served with the population's mean mixture)."""
        if mixture is not None and tuple(mixture.shape) != (len(self.layer_names), self.k):
            raise ValueError(f"a mixture for this model is [{len(self.layer_names)}, {self.k}], "
                             f"got {list(mixture.shape)}")
        self.ctx.mixture = mixture
        try:
            yield self.ctx
        finally:
            self.ctx.mixture = None

    def forward(self, input_ids, attention_mask=None, user_emb=None, **kw):
        with self.users(user_emb):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kw)


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
