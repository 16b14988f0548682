"""ProperLinear's serving paths: its forward() with gradients off (generation, evaluation), the
weights it derives from the parameters kept between calls, and the fused path that serves one user.

A mixin of ProperLinear (shared/method/adapters.py), which owns the parameters and the training
forward; the methods here read them and the batch's RoutingContext, and change nothing but the kept
weights.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F


class ServingPaths:
    # ---- serving: forward() with gradients off, the derived weights kept
    # Decoding calls every layer once per token with the same adapter weights, and each call re-built
    # the concatenated router + expert A weights, the permuted expert B and, under autocast, their
    # bfloat16 copies (F.linear casts its float32 operands on every call). With gradients off these
    # are built once and kept, keyed on the identity, version counter and storage of every tensor
    # they are built from: an in-place change (load_part_state, an optimizer step, a merge, copy_)
    # bumps the version and `.data =` moves the storage, so a changed weight is never served from
    # the cache, whoever changed it. Nothing else changes: the same operations on the same values in
    # the same order as forward()'s, so the outputs are the same bit for bit (tested).
    def _keep(self, name: str, build, sources: tuple, dtype: torch.dtype):
        key = tuple((t._version, t.data_ptr()) for t in sources) + (dtype, torch.is_autocast_enabled(
            sources[0].device.type))
        hit = self._kept.get(name)
        if hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], sources)):
            return hit[2]
        value = build(dtype)
        self._kept[name] = (sources, key, value)  # the sources held: no id is reused meanwhile
        return value

    def clear_cache(self):
        """Drop the kept weights (frees memory; a stale entry is never served anyway)."""
        self._kept.clear()

    def _serving_weights(self, dtype: torch.dtype) -> tuple:
        """(router + expert A [k + k*r, in], expert B [out, k*r], A_u, B_u, W_g, b_g) in the dtype the
        matmuls compute in; a power-of-two scaling folded into B (see folds)."""
        k, r = self.k, self.r_group

        def build(dt):
            b_g = self.expert_B.permute(1, 0, 2).reshape(self.out_features, k * r)
            return (torch.cat([self.router_h, self.expert_A.reshape(k * r, -1)]).to(dt),
                    (b_g * self.expert_scaling if self._fold_g else b_g).to(dt), self.user_A.to(dt),
                    (self.user_B * self.user_scaling if self._fold_u else self.user_B).to(dt),
                    self.router_g.to(dt), self.router_g_bias.to(dt))
        return self._keep("weights", build, (self.router_h, self.expert_A, self.expert_B, self.user_A,
                                             self.user_B, self.router_g, self.router_g_bias), dtype)

    def _serve(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        """forward() of stages group and user (population merged) with gradients off."""
        k, r, dt, dev = self.k, self.r_group, x.dtype, x.device.type
        # under autocast F.linear casts x and the weights to the autocast dtype on every call: x is
        # cast once here and the kept weights are kept cast (the same rounding, done once)
        wd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else dt
        w_route, w_experts, user_a, user_b, g, g_bias = self._serving_weights(wd)
        xm = x.to(wd)
        h = self.base(xm)
        both = F.linear(xm, w_route)                                              # [..., k + k*r]
        logits, xa = both[..., :k], both[..., k:]
        emb = self.ctx.user_emb
        if emb is not None:   # W_u e_u: the same at every token of the batch, kept for its steps
            u = self._keep("user_logits", lambda d: F.linear(emb.to(d), self.router_u.to(d)), (emb, self.router_u), dt)
            logits = logits + u.view(u.shape[0], *([1] * (logits.dim() - 2)), k)
        if stage == "user":
            if self.ctx.user_index is None:
                z = F.linear(xm, user_a)
                logits = logits + F.linear(z, g, g_bias)
                h = h + F.linear(z if self._fold_u else z * self.user_scaling, user_b)
            else:
                stack, rows = self.ctx.user_stack[self.index], self.ctx.user_index
                # each row's user parts, gathered once for the batch's steps (as _user_terms gathers them)
                parts = self._keep("user_rows", lambda d: tuple(t[rows].to(d) for t in stack), (*stack, rows), dt)
                router_terms, user_out = self._rows_terms(x, *parts)
                logits = logits + router_terms
                h = h + user_out
        weights = self._weights(logits)
        w = weights.to(dt)
        if not self._fold_g:
            w = w * self.expert_scaling
        xa = (xa.unflatten(-1, (k, r)) * w.unsqueeze(-1)).flatten(-2)
        return h + F.linear(xa, w_experts)

    # ---- fused serving of one user (ProperLinear.fuse): fewer, smaller operations per token
    # Decoding one token runs each adapted layer on a [B, 1, in] input, where every small operation
    # costs its dispatch more than its arithmetic (about 2-12 us each on one AMD EPYC core against a
    # 85-90 us float32 GEMV for the base layer), and a small bfloat16 GEMM costs oneDNN 20-30 us where
    # the same float32 one costs 5 (bench/generation.py). With one user loaded, what does not change
    # while it is served is folded once into kept float32 tensors:
    #   w_in  = [W_h + W_g A_u ; A_1 ; A_u ; A_2 ; A_u ; .. ; A_k ; A_u]   logits and every block's z
    #   bias  = [W_u e_u + b_g ; 0]                                          the logits' constant
    #   w_out = [s_g B_1 , s_u B_u , .. , s_g B_k , s_u B_u]                 every block back to out
    # The user LoRA rides in every expert's block: the routing weights sum to 1, so
    # sum_e w_e (s_g B_e A_e + s_u B_u A_u) x = sum_e w_e s_g B_e A_e x + s_u B_u A_u x, and the k
    # blocks of r + r_u columns are scaled by their weight in one broadcast multiply (no concatenation
    # per token). Per token: the base layer (as the bare backbone runs it, under autocast if on), one
    # matmul in (bias added), a softmax, one multiply, one addmm onto the base's output, in float32.
    # The same sums in another order and precision: the outputs differ from _serve's in the last bits
    # (bench/generation.py counts the greedy tokens that change), so the evaluation keeps the exact
    # path and fusing is opted into for serving (docs/decisions.md).
    def _fused_parts(self, stage: str, emb: torch.Tensor | None) -> tuple:
        """(w_in, bias [k + k*rr] or None, per-row constant [B, k] or None, w_out [k*rr, out]), kept."""
        k = self.k
        user = stage == "user"

        def build(dt):
            router = self.router_h + (self.router_g @ self.user_A if user else 0.0)
            rows, cols = [router], []
            for e in range(k):
                rows.append(self.expert_A[e])
                cols.append(self.expert_B[e] * self.expert_scaling)
                if user:
                    rows.append(self.user_A)
                    cols.append(self.user_B * self.user_scaling)
            w_in, w_out = torch.cat(rows).to(dt), torch.cat(cols, dim=1).T.contiguous().to(dt)
            c = self.router_g_bias.view(1, -1) if user else None
            if emb is not None:
                c = F.linear(emb.view(-1, emb.shape[-1]).to(dt), self.router_u.to(dt),
                             None if c is None else c.view(-1).to(dt))
            if c is None or c.shape[0] > 1:   # no constant, or one per row: added to the logits
                return w_in, None, c, w_out
            return w_in, torch.cat([c.view(-1).to(dt), c.new_zeros(w_in.shape[0] - k)]), None, w_out
        p = self._parameters   # a dict lookup each: nn.Module.__getattr__ costs about 1 us a call
        sources = (p["router_h"], p["expert_A"], p["expert_B"], p["user_A"], p["user_B"], p["router_g"],
                   p["router_g_bias"], p["router_u"]) + (() if emb is None else (emb,))
        return self._keep(f"fused_{stage}", build, sources, torch.float32)

    def _serve_fused(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        k, dev = self.k, x.device.type
        w_in, bias, c, w_out = self._fused_parts(stage, self.ctx.user_emb)
        if self.fan_in_fan_out:    # a GPT-2 Conv1D holds its weight as [in, out]: let it run itself
            h = self._modules["base"](x)
        else:
            base = self._modules["base"]._parameters
            h = F.linear(x, base["weight"], base["bias"])                           # as the bare backbone runs it
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext():
            both = F.linear(x.float(), w_in, bias)                                # [..., k + k*rr]
            logits = both[..., :k]
            if c is not None:
                logits = logits + c.view(c.shape[0], *([1] * (x.dim() - 2)), k)
            w = torch.softmax(logits, dim=-1)
            n = w.numel() // k
            z = both[..., k:].reshape(n, k, -1) * w.reshape(n, k, 1)              # each block by its weight
            out = torch.addmm(h.reshape(n, -1).float(), z.view(n, -1), w_out)
        # float32 out: the next operations (the activation, the residual add) take it as they take
        # the exact path's bfloat16, and the next adapted layer reads it without a cast back
        return out.view(h.shape)


def folds(scaling: float) -> bool:
    """Whether serving may move a LoRA scaling from the activations onto the kept B without changing
    a bit: a power of two >= 1 (the defaults: alpha / r = 2). Multiplying by 2^n, n >= 0, is exact in
    binary floating point short of overflow and commutes with rounding to bfloat16, so (s z) B and
    z (s B) are the same products, summed in the same order."""
    m, e = math.frexp(scaling)
    return m == 0.5 and e >= 1
