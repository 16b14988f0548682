"""The three progressive adapters of PROPER, owned by one layer class.

Every target FFN linear layer of the backbone is replaced by a `ProperLinear` that keeps the
frozen base layer and adds, stage by stage (docs/decisions.md, "The method"):

  population  h = W x + s_p B_p A_p x                          (one LoRA, r=8; merged after stage 1)
  group       h = W_p x + sum_e beta_e s_g B_e A_e x           (k expert LoRAs, r=4)
              beta = softmax(W_h x + W_u e_u)                  (user-aware router)
  user        h = W_p x + sum_e gamma_e s_g B_e A_e x + s_u B_u A_u x
              gamma = softmax(W_h x + W_u e_u + W_g (A_u x) + b_g)   (LoRA-aware router)

The LoRA-aware router is written as a residual on the frozen user-aware router's logits, with
W_g = 0 and b_g = 0 at initialisation, so that a user's stage-3 model starts *exactly* at its
stage-2 model, token by token (docs/decisions.md explains why this and not b_g = log p_u alone).

The experts are stacked: one matmul computes every expert's A_e x and one computes the weighted
sum of B_e, so there is no Python loop over experts. With gradients off (generation, evaluation)
the same computation keeps the weights it derives from the parameters between calls
(shared/method/layer_serving.py: the serving paths, exact and fused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.method.layer_serving import ServingPaths, folds

STAGES = ("base", "population", "group", "user")


@dataclass
class RoutingContext:
    """Per-batch facts the layers need but the HF forward() cannot carry.

    user_emb: [B, d] embeddings of the batch's users (stages group and user).
    record:   when True every layer appends its routing weights [B, T, k] to `betas`.
    mixture:  [L, k] fixed expert weights of layer l for every row and token, in place of the
              router: how a user with no history is served (the population's mean mixture).
    user_stack: per layer, the user parts of several users stacked (A_u [U, r, in], B_u [U, out, r],
              W_g [U, k, r], b_g [U, k]); with user_index [B] (row -> user), stage 3 computes each
              row of a batch with its own user's LoRA and LoRA-aware router (multi-user batches).
    """
    user_emb: torch.Tensor | None = None
    record: bool = False
    mixture: torch.Tensor | None = None
    user_stack: list | None = None
    user_index: torch.Tensor | None = None
    betas: list = field(default_factory=list)


def _in_out(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores W as [in, out]
        return base.weight.shape[0], base.weight.shape[1], True
    raise TypeError(f"cannot put LoRAs on {type(base).__name__}: only Linear and Conv1D are supported")


class ProperLinear(ServingPaths, nn.Module):
    keep_weights = True   # serving (gradients off) keeps derived weights, see _serve; False: forward() as in training
    fuse = False          # serving one user: its parts folded into kept float32 weights (_serve_fused; not exact)
    def __init__(self, base: nn.Module, ctx: RoutingContext, *, k: int = 5, r_population: int = 8,
                 alpha_population: float = 16, r_group: int = 4, alpha_group: float = 8,
                 r_user: int = 4, alpha_user: float = 8, d_user: int = 128, router_u_init: float = 0.02,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features, self.out_features, self.fan_in_fan_out = _in_out(base)
        self.k, self.r_group, self.r_user = k, r_group, r_user
        n_in, n_out = self.in_features, self.out_features

        # Stage 1: population LoRA (PEFT names: lora_A [r, in], lora_B [out, r]).
        self.lora_A = nn.Parameter(torch.empty(r_population, n_in))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r_population))
        self.scaling = alpha_population / r_population
        # Stage 2: k expert LoRAs, stacked, and the user-aware router.
        self.expert_A = nn.Parameter(torch.empty(k, r_group, n_in))
        self.expert_B = nn.Parameter(torch.zeros(k, n_out, r_group))
        self.expert_scaling = alpha_group / r_group
        self.router_h = nn.Parameter(torch.empty(k, n_in))      # W_h
        self.router_u = nn.Parameter(torch.empty(k, d_user))    # W_u
        self.router_u_init = router_u_init                      # std of W_u at init (adapters.router_u_init)
        # Stage 3: the user's LoRA and the LoRA-aware router (W_g, b_g) reading z = A_u x.
        self.user_A = nn.Parameter(torch.empty(r_user, n_in))
        self.user_B = nn.Parameter(torch.zeros(n_out, r_user))
        self.user_scaling = alpha_user / r_user
        self.router_g = nn.Parameter(torch.zeros(k, r_user))    # W_g
        self.router_g_bias = nn.Parameter(torch.zeros(k))       # b_g

        self.stage = "base"
        self.index = 0  # position among the model's target layers: its row of ctx.mixture
        self.merged = False  # True once the population LoRA is folded into base.weight (W_p)
        self.unmerged_weight: torch.Tensor | None = None  # W while merged
        self._kept: dict = {}  # serving: weights derived from the parameters, kept (see _keep)
        self._fold_g, self._fold_u = folds(self.expert_scaling), folds(self.user_scaling)
        self.reset_population(generator)
        self.reset_group(generator)
        self.reset_user(generator)
        for p in self.parameters():
            p.requires_grad_(False)

    # ---- initialisation: A like PEFT (kaiming-uniform), B = 0, so each new adapter starts as a no-op
    @torch.no_grad()
    def reset_population(self, g=None):
        _kaiming_(self.lora_A, g)
        self.lora_B.zero_()

    @torch.no_grad()
    def reset_group(self, g=None):
        for e in range(self.k):
            _kaiming_(self.expert_A[e], g)
        self.expert_B.zero_()
        # Small random routers break the symmetry between experts; B = 0 keeps h = W_p x at start.
        self.router_h.normal_(0.0, 0.02, generator=g) if g is not None else self.router_h.normal_(0.0, 0.02)
        std_u = self.router_u_init
        self.router_u.normal_(0.0, std_u, generator=g) if g is not None else self.router_u.normal_(0.0, std_u)

    @torch.no_grad()
    def reset_user(self, g=None):
        _kaiming_(self.user_A, g)
        self.user_B.zero_()
        self.router_g.zero_()
        self.router_g_bias.zero_()

    # ---- the population merge: W_p = W + s_p B_p A_p
    def _population_delta(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # [out, in]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge_population(self, keep: bool = True):
        if self.merged:
            raise RuntimeError("population LoRA is already merged")
        # W kept to unmerge exactly: W + d - d differs from W in the last bits, and Adam's first steps
        # (about lr * sign(g)) turn that into different training when a long-lived client moves
        # back to the bare backbone, e.g. between runs. A process that never moves back (`proper
        # generate`) passes keep=False and saves a copy of every target weight.
        self.unmerged_weight = self.base.weight.detach().clone() if keep else None
        self.base.weight += self._population_delta().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge_population(self):
        if not self.merged:
            raise RuntimeError("population LoRA is not merged")
        if self.unmerged_weight is None:
            raise RuntimeError("the backbone's weight was not kept at the merge (merged with keep=False, "
                               "or folded by shared/method/mta.py, which restores it itself)")
        self.base.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged = False

    # ---- forward
    # Why the forward is shaped as it is (bench/throughput.py measures it against plain PEFT):
    # on CPU a training step is dominated by the passes over the big [tokens, in] and
    # [tokens, out] activations, so the router and the experts' A matrices share one matmul
    # over x (one read and one autocast copy of x forward, one [tokens, in] gradient backward),
    # and the LoRA scalings and routing weights are applied to the small rank-sized
    # projections, never to the [tokens, out] outputs (exact for the default power-of-two
    # scalings, equal up to rounding otherwise).
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """W_h x_t + W_u e_u: [B, T, k]."""
        return self._add_user_logits(F.linear(x, self.router_h.to(x.dtype)), x.dtype)

    def _add_user_logits(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """logits + W_u e_u, the user's part of the user-aware router, per row of the batch."""
        if self.ctx.user_emb is None:
            return logits
        u = F.linear(self.ctx.user_emb.to(dtype), self.router_u.to(dtype))  # [B, k]
        return logits + u.view(u.shape[0], *([1] * (logits.dim() - 2)), self.k)

    def _route_and_project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router_logits(x), every expert's A_e x as [..., k*r]) from one matmul over x."""
        k = self.k
        w = torch.cat([self.router_h, self.expert_A.reshape(k * self.r_group, -1)]).to(x.dtype)
        both = F.linear(x, w)                                                     # [..., k + k*r]
        return self._add_user_logits(both[..., :k], x.dtype), both[..., k:]

    def _expert_sum(self, xa: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum_e w_e s_g B_e (A_e x), given xa = [A_1 x, ..., A_k x]: one matmul for all experts."""
        k, r = self.k, self.r_group
        w = weights.to(dtype) * self.expert_scaling                               # [..., k], small
        xa = (xa.unflatten(-1, (k, r)) * w.unsqueeze(-1)).flatten(-2)             # weight each rank block
        b = self.expert_B.permute(1, 0, 2).reshape(self.out_features, k * r)      # [out, k*r]
        return F.linear(xa, b.to(dtype))

    def _user_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_g z_t + b_g, s_u B_u z_t) with z_t = A_u x_t: of the loaded user, or, in a batch of
        several users (ctx.user_index), of each row's own user: per-row weights, batched matmuls."""
        dt = x.dtype
        if self.ctx.user_index is None:
            z = F.linear(x, self.user_A.to(dt))                                   # z_t = A_u x_t
            return (F.linear(z, self.router_g.to(dt), self.router_g_bias.to(dt)),
                    F.linear(z * self.user_scaling, self.user_B.to(dt)))
        return self._rows_terms(x, *(t[self.ctx.user_index].to(dt) for t in self.ctx.user_stack[self.index]))

    def _rows_terms(self, x, a, b, g, g_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """_user_terms with each row's own user parts (a [B, r, in], b [B, out, r], g [B, k, r], g_bias [B, k])."""
        z = torch.einsum("bti,bri->btr", x, a)                                    # [B, T, r]
        return (torch.einsum("btr,bkr->btk", z, g) + g_bias.unsqueeze(1),
                torch.einsum("btr,bor->bto", z * self.user_scaling, b))

    def mix_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_e w_e s_g B_e A_e x, all experts in two matmuls."""
        xa = F.linear(x, self.expert_A.reshape(self.k * self.r_group, -1).to(x.dtype))
        return self._expert_sum(xa, weights, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stage = self.stage
        if stage in ("group", "user") and self.merged and self.keep_weights and not torch.is_grad_enabled():
            ctx = self.ctx
            if self.fuse and ctx.user_index is None and ctx.mixture is None and not ctx.record:
                return self._serve_fused(x, stage)
            return self._serve(x, stage)
        h = self.base(x)
        if stage == "base":
            if self.merged:
                raise RuntimeError("the bare backbone is gone: the population LoRA is merged")
            return h
        if not self.merged:
            h = h + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling
        if stage == "population":
            return h
        logits, xa = self._route_and_project(x)
        if stage == "user":
            # Stage 2's computation, untouched (A_u is not folded into its matmul), plus terms
            # that are exactly zero at initialisation: stage 3 starts bit for bit at stage 2.
            router_terms, user_out = self._user_terms(x)
            logits = logits + router_terms
            h = h + user_out
        return h + self._expert_sum(xa, self._weights(logits), x.dtype)

    def _weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The experts' weights from the router's logits (recorded when asked)."""
        if self.ctx.mixture is None:
            weights = torch.softmax(logits.float(), dim=-1)
        else:  # a user with no history: no e_u was learned, the population's mean mixture routes
            weights = self.ctx.mixture[self.index].float().expand(logits.shape)
        if self.ctx.record:
            self.ctx.betas.append(weights)
        return weights

    # ---- which parameters belong to which stage
    PARTS = {
        "population": ("lora_A", "lora_B"),
        "group": ("expert_A", "expert_B", "router_h", "router_u"),
        "user": ("user_A", "user_B", "router_g", "router_g_bias"),
    }

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, stage={self.stage}, "
                f"merged={self.merged}")


def _kaiming_(t: torch.Tensor, g: torch.Generator | None):
    # Same distribution as nn.init.kaiming_uniform_(a=sqrt(5)) that PEFT uses for lora_A.
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        if g is None:
            t.uniform_(-bound, bound)
        else:
            t.copy_(torch.rand(t.shape, generator=g) * 2 * bound - bound)
