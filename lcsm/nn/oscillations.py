"""Oscillation stages: x -> the decay of the recurrence (a lcsm.kernels Decay), one module per kind.

This module is the oscillation registry: `OSCILLATIONS` maps each spec `kind` to its module, and
nothing outside it builds an oscillation by name. Every module returns an `OscillationOut`: the
Decay the mixer passes to the recurrence, and what the other stages' ties read (Δ for the Δ-scaled
input, the decay along K for HGRN2's e = 1 - o, the running-softmax scale of e, the rotation
angles). Class attributes describe the kind to the mixer: `decays` (whether o ≠ 1, for FLOPs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm import parallel
from lcsm.kernels.decay import Decay
from lcsm.nn.cache import store
from lcsm.nn.context import LayerContext
from lcsm.nn.gates import Gate, fixed_log_decay, param_for_log_decay
from lcsm.nn.packing import current as packing
from lcsm.nn.stages.common import gate_dtype, keep_constant, on_device
from lcsm.parallel.context import all_gather


@dataclass
class OscillationOut:
    decay: Decay = field(default_factory=Decay)  # the stages pass Decay() themselves: dynamo cannot call this factory
    delta: torch.Tensor | None = None  # Δ: [B,T,H] / [B,T,H,V] / [H] / [H,V]
    expand_scale: torch.Tensor | None = None  # multiplies e: [B,T,H,1] or [B,T,H,K]
    angles: torch.Tensor | None = None  # rotation: [T,K/2]
    log_k: torch.Tensor | None = None  # the log decay along K, broadcastable to [B,T,H,K] (for e = 1 - o)
    beta: torch.Tensor | None = None  # the delta rule's β: [B,T,H] or [H]; the removal key is the expand key

    def with_expand(self, e: torch.Tensor) -> tuple[torch.Tensor, Decay]:
        """(e, the decay) once the expand key e [B,T,H,K] is known: a delta oscillation takes it as
        the removal key w (normalised by the expand stage) and writes with β·w, given to the
        recurrence as beta with w = e (the Triton kernels' own form; see lcsm/kernels/decay.py)."""
        if self.beta is None:
            return e, self.decay
        return e, replace(self.decay, w=e, beta=self.beta.to(e.dtype))


class Oscillation(nn.Module):
    """Base of the registered kinds, each with forward(x [B,T,d], positions [T] (absolute), cache
    (its sub-dict while decoding, or None)) -> OscillationOut."""

    decays = True  # o ≠ 1: the recurrent form multiplies the state every token
    transition_flops = 0  # per state element and token beyond the decay (a delta rule: its read and rank-1 update)


class Ones(Oscillation):
    decays = False

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()

    def forward(self, x, positions, cache=None):
        return OscillationOut(Decay())


class Scalar(Oscillation):
    """g: one log decay per head, fixed / learned [H] or per token [B,T,H]."""

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.gate = Gate(spec, ctx, (H,))

    def forward(self, x, positions, cache=None):
        g, delta = self.gate(x)
        return OscillationOut(Decay(g=g), delta=delta, log_k=g[..., None])


class VectorK(Oscillation):
    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.gate = Gate(spec, ctx, (H, K))

    def forward(self, x, positions, cache=None):
        gk, delta = self.gate(x)
        return OscillationOut(Decay(gk=gk), delta=delta, log_k=gk)


class VectorV(Oscillation):
    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.gate = Gate(spec, ctx, (H, V))

    def forward(self, x, positions, cache=None):
        gv, delta = self.gate(x)
        return OscillationOut(Decay(gv=gv), delta=delta)


class Outer(Oscillation):
    """o = σ(W₁x)^{1/τ} ⊗ σ(W₂x)^{1/τ}: log o = gk ⊕ gv."""

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.gate_k = Gate(spec, ctx, (H, K))
        self.gate_v = Gate(spec, ctx, (H, V))

    def forward(self, x, positions, cache=None):
        (gk, _), (gv, _) = self.gate_k(x), self.gate_v(x)
        return OscillationOut(Decay(gk=gk, gv=gv))


class Full(Oscillation):
    """A K×V decay. exp_softplus: log o = Δ ⊗ A with Δ = softplus(W x + b) ∈ R^V (Mamba/S6; a
    learned Δ gives S4D), A = -exp(A_log), A_log init log(1..K) (S4D-real). sigmoid_tau:
    log o = logσ(z ⊙ P)/τ with z = W x ∈ R^V (LCSM o_type 7), or logσ(P)/τ with source param."""

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.spec = spec
        if spec.parametrization == "exp_softplus":
            self.delta = Gate(spec, ctx, (H, V), own_A=False)
            a = torch.arange(1, K + 1, dtype=torch.float32)[None, :, None].expand(H, K, V)
            self.A_log = nn.Parameter(torch.log(a).clone())
        else:
            # P starts at the ALiBi decay of its head, like every data-independent gate
            alibi = fixed_log_decay("alibi", H, ctx.layer_idx, ctx.n_layers)[:, None, None].expand(H, K, V)
            self.P = nn.Parameter(param_for_log_decay(alibi, "sigmoid_tau", spec.tau, 0.0).float())
            if spec.source == "data":
                self.proj = nn.Linear(ctx.d_model, H * V, bias=True)
                nn.init.zeros_(self.proj.weight)
                nn.init.ones_(self.proj.bias)  # z = 1 at start: the same decay as the param form
                self.proj._keep_init = True
        self.H, self.V = H, V

    def forward(self, x, positions, cache=None):
        dtype = gate_dtype(x)
        if self.spec.parametrization == "exp_softplus":
            neg_delta, delta = self.delta(x)
            A = -torch.exp(self.A_log.to(dtype))
            if self.spec.source == "data":
                return OscillationOut(Decay(dt=delta, A=A), delta=delta)
            return OscillationOut(Decay(A=delta[:, None, :] * A), delta=delta)
        P = self.P.to(dtype)
        if self.spec.source == "param":
            return OscillationOut(Decay(A=F.logsigmoid(P) / self.spec.tau))
        z = self.proj(x).to(dtype).unflatten(-1, (self.H, self.V))
        return OscillationOut(Decay(A=F.logsigmoid(z[..., None, :] * P) / self.spec.tau))


class Rotation(Oscillation):
    """o = e^{iθ}: no decay; expand and shrink get [x cos tθ, x sin tθ] (K/2 frequencies)."""

    decays = False

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        half = K // 2
        if spec.theta == "uniform":
            theta = torch.full((half,), math.pi / (2 * spec.max_len), dtype=torch.float64)
        else:
            theta = spec.base ** (-2.0 * torch.arange(half, dtype=torch.float64) / K)
        if spec.theta == "learned":
            self.theta = nn.Parameter(theta.float())
        else:
            keep_constant(self, "_theta", theta)  # fp64: model.half() must not round angles

    def forward(self, x, positions, cache=None):
        dtype = gate_dtype(x)
        theta = self.theta if hasattr(self, "theta") else on_device(self, "_theta", x, torch.float64)
        return OscillationOut(Decay(), angles=positions.to(dtype)[:, None] * theta.to(dtype))


class CumSoftmax(Oscillation):
    """o_t = exp(LSE_{t-1} - LSE_t), LSE = logcumsumexp(z); e is scaled by 1 - o_t = exp(z_t - LSE_t),
    so m_t = Σ_s softmax_{r<=t}(z)_s e_s i_sᵀ. The first token's decay multiplies m_0 = 0 and is
    set to 0 (log o_1 = -inf otherwise)."""

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.dims = (H,) if spec.along == "head" else (H, K)
        n = math.prod(self.dims)
        d_model = ctx.d_model
        self.proj = (
            nn.Sequential(nn.Linear(d_model, spec.rank, bias=False), nn.Linear(spec.rank, n))
            if spec.rank
            else nn.Linear(d_model, n)
        )

    def forward(self, x, positions, cache=None):
        z = self.proj(x).to(gate_dtype(x)).unflatten(-1, self.dims).clamp(-10.0, 10.0)
        pk = packing()
        if pk is not None and cache is None:
            # packed documents: the normaliser restarts at each one (its first token's decay is 0 too)
            log_o, scale = (torch.cat(parts, dim=1) for parts in zip(*(self.normalise(part) for part in pk.split(z))))
            return self.out(log_o, scale)
        lse = torch.logcumsumexp(z, dim=1)
        prev = None if cache is None else cache.get("lse")  # the running normaliser LSE_{t-1} [B,*dims]
        sp = parallel.current()
        if sp is not None and prev is None:
            # sequence parallel: the normaliser starts from the earlier slices' LSE (one all-gather of [B,*dims])
            totals = all_gather(lse[:, -1], sp)
            if sp.rank > 0:
                prev = torch.logsumexp(totals[: sp.rank], dim=0)
            else:
                lse = lse + 0.0 * totals.sum()  # every rank joins the all-gather's backward
        if prev is None:
            log_o = torch.cat([torch.zeros_like(lse[:, :1]), lse[:, :-1] - lse[:, 1:]], dim=1)
        else:
            lse = torch.logaddexp(prev[:, None], lse)
            log_o = torch.cat([prev[:, None], lse[:, :-1]], dim=1) - lse
        if cache is not None:
            store(cache, "lse", lse[:, -1])
        return self.out(log_o, torch.exp(z - lse))

    @staticmethod
    def normalise(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence from its start: z [B,T,*dims] -> (log o, the scale of e), both like z."""
        lse = torch.logcumsumexp(z, dim=1)
        log_o = torch.cat([torch.zeros_like(lse[:, :1]), lse[:, :-1] - lse[:, 1:]], dim=1)
        return log_o, torch.exp(z - lse)

    def out(self, log_o: torch.Tensor, scale: torch.Tensor) -> OscillationOut:
        if len(self.dims) == 1:
            return OscillationOut(Decay(g=log_o), expand_scale=scale[..., None], log_k=log_o[..., None])
        return OscillationOut(Decay(gk=log_o), expand_scale=scale, log_k=log_o)


class Delta(Oscillation):
    """The delta rule: (I − w eᵀ) D with w the expand key k̂ (L2-normalised by the expand stage),
    e = β k̂, and D the element-wise decay of `spec.decay` (built by this registry). β per head:
    σ(W_β x) (or 2σ), a learned per-head value, or fixed."""

    def __init__(self, spec, ctx: LayerContext, H: int, K: int, V: int):
        super().__init__()
        self.inner = build_oscillation(spec.decay, ctx, H, K, V)
        self.decays = self.inner.decays
        self.transition_flops = 4  # eᵀ(D⊙m) and the rank-one update w ⊗ (·): 2 FLOPs each per element
        self.H = H
        b = spec.beta
        self.map, self.source, self.value = b.map, b.source, b.value
        if b.source == "data":
            self.beta_proj = nn.Linear(ctx.d_model, H, bias=False)  # fla's b_proj: no bias
        elif b.source == "param":
            self.beta_z = nn.Parameter(torch.zeros(H))

    def forward(self, x, positions, cache=None):
        out = self.inner(x, positions, cache)
        dtype = gate_dtype(x)
        if self.source == "fixed":
            beta = torch.full((self.H,), self.value, dtype=dtype, device=x.device)
        else:
            z = self.beta_proj(x).to(dtype) if self.source == "data" else self.beta_z.to(dtype)
            beta = torch.sigmoid(z) * (2.0 if self.map == "sigmoid2" else 1.0)
        return replace(out, beta=beta)


OSCILLATIONS: dict[str, type[Oscillation]] = {
    "ones": Ones,
    "scalar": Scalar,
    "vector_k": VectorK,
    "vector_v": VectorV,
    "outer": Outer,
    "full": Full,
    "rotation": Rotation,
    "cumsoftmax": CumSoftmax,
    "delta": Delta,
}


def build_oscillation(spec, ctx: LayerContext, H: int, K: int, V: int) -> Oscillation:
    """The oscillation module of a spec (an oscillation kind of lcsm.config.spec)."""
    return OSCILLATIONS[spec.kind](spec, ctx, H, K, V)
