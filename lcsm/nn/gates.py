"""Decay gates: hand-crafted slopes and the parametrisations that turn a pre-activation z into a
log decay (<= 0): sigmoid_tau (o = σ(z)^{1/τ}), exp_softplus (o = exp(-softplus(z)·a), Mamba
style) and lower_bound (o = b + (1 - b)σ(z), HGRN2; b may be learned per layer)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm.nn.context import LayerContext
from lcsm.nn.fused import bounded_sigmoid_log, sigmoid_log
from lcsm.nn.stages.common import gate_dtype, keep_constant, on_device


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8h/H), h = 1..H, interleaved for H not a power of two."""

    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(H).is_integer():
        return torch.tensor(powers(H), dtype=torch.float64)
    closest = 2 ** math.floor(math.log2(H))
    return torch.tensor(powers(closest) + powers(2 * closest)[0::2][: H - closest], dtype=torch.float64)


def fixed_log_decay(kind: str, H: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """Hand-crafted log decay per head, [H] fp64 (all < 0)."""
    if kind == "alibi":
        return -alibi_slopes(H)
    if kind == "tnl":  # TNL's released code: slope · (1 - l/(L-1) + 1e-5), smaller decay higher up
        depth = 1.0 - layer_idx / max(n_layers - 1, 1) + 1e-5
        return -alibi_slopes(H) * depth
    if kind == "retnet":  # γ_h = 1 - 2^(-5-h)
        return torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))))
    raise ValueError(f"unknown slopes '{kind}'")


def param_for_log_decay(log_o: torch.Tensor, parametrization: str, tau: float, lower_bound) -> torch.Tensor:
    """The pre-activation z whose gate gives log_o (to initialise learned decays)."""
    o = torch.exp(log_o)
    if parametrization == "sigmoid_tau":
        return torch.logit(o**tau)
    if parametrization == "exp_softplus":  # -softplus(z) = log o, with A_log = 0
        return torch.log(torch.expm1(-log_o))
    bound = 0.0 if lower_bound == "layerwise" else lower_bound
    return torch.logit(((o - bound) / (1 - bound)).clamp(1e-4, 1 - 1e-4))


class Gate(nn.Module):
    """A decay gate of shape `dims` per token (source data) or static (param, fixed).

    forward(x [B,T,d]) -> (log_o [B,T,*dims] or [*dims], delta or None), delta being Δ for
    exp_softplus (Mamba's step size, used by the Δ-scaled input tie). With own_A=False the gate
    has no A of its own and returns -Δ (the `full` oscillation multiplies by its K×V A).
    """

    def __init__(self, spec, ctx: LayerContext, dims: tuple[int, ...], own_A: bool = True):
        super().__init__()
        d_model, layer_idx, n_layers = ctx.d_model, ctx.layer_idx, ctx.n_layers
        self.own_A = own_A
        self.source, self.dims = spec.source, dims
        self.parametrization = None if spec.source == "fixed" else spec.parametrization
        self.tau = spec.tau
        self.lower_bound = spec.lower_bound
        n = math.prod(dims)
        H = dims[0]
        self.layer_idx = layer_idx
        self.bounds = None
        if self.parametrization == "lower_bound" and spec.lower_bound == "layerwise":
            # HGRN2: Γ ∈ R^{L×n} shared by the layers, β_l = cumsum(softmax(Γ, 0))_l - β_0, so
            # β_0 = 0 and β grows with depth (the Model holds Γ as `lower_bounds`)
            self.bounds = ctx.shared_parameter("lower_bounds", lambda: nn.Parameter(torch.ones(n_layers, n)))
            # the layer's row as a tensor, not an int: compiled blocks (Model.compile_blocks) then share
            # one graph instead of one per layer (dynamo guards on int attributes)
            self.register_buffer("layer_row", torch.tensor([layer_idx]), persistent=False)
        # data-independent gates start from the ALiBi decays (LCSM's note); per head, same along K/V
        target = fixed_log_decay(getattr(spec, "slopes", "alibi") if spec.source == "fixed" else "alibi", H, layer_idx, n_layers)
        target = target.view(H, *[1] * (len(dims) - 1)).expand(dims).clone()
        if spec.source == "fixed":
            keep_constant(self, "_fixed", target)
            return
        if spec.source == "param":
            self.z = nn.Parameter(param_for_log_decay(target, self.parametrization, spec.tau, spec.lower_bound).float())
        elif spec.rank:
            self.proj = nn.Sequential(nn.Linear(d_model, spec.rank, bias=False), nn.Linear(spec.rank, n, bias=True))
        else:
            self.proj = nn.Linear(d_model, n, bias=True)
        if self.parametrization == "exp_softplus":
            # Mamba2: A = -exp(A_log) per feature, A_log ~ log U(1, 16); Δ bias from U(1e-3, 1e-1)
            if own_A:  # `full` keeps its own K×V A instead
                self.A_log = nn.Parameter(torch.log(torch.empty(dims).uniform_(1, 16)) if spec.source == "data" else torch.zeros(dims))
            if spec.source == "data":
                dt = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(1e-1)))
                last = self.proj[-1] if isinstance(self.proj, nn.Sequential) else self.proj
                with torch.no_grad():
                    last.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt

    def forward(self, x: torch.Tensor):
        dtype = gate_dtype(x)
        if self.source == "fixed":
            return on_device(self, "_fixed", x, dtype), None
        if self.source == "param":
            z = self.z.to(dtype)
        else:
            z = self.proj(x).unflatten(-1, self.dims)  # in the projection's dtype: the gate computes in `dtype`
        return self.activate(z, dtype)

    def layer_bound(self) -> torch.Tensor:
        """β of this layer, [*dims] (the layer-wise lower bound)."""
        gamma = self.bounds.get()
        beta = torch.cumsum(F.softmax(gamma, dim=0), dim=0)
        return (beta.index_select(0, self.layer_row) - beta[0]).view(self.dims)

    def activate(self, z: torch.Tensor, dtype: torch.dtype):
        """(log o in `dtype`, Δ or None) from the pre-activation z (any float dtype). The sigmoid
        gates run as fused functions (lcsm/nn/fused.py) that keep z, not fp32 copies of it."""
        if self.parametrization == "sigmoid_tau":
            return sigmoid_log(z, self.tau), None
        if self.parametrization == "exp_softplus":
            delta = F.softplus(z.to(dtype))
            return (-delta * torch.exp(self.A_log.to(dtype)) if self.own_A else -delta), delta
        # lower_bound: o = b + (1 - b) σ(z)
        bound = self.lower_bound if self.bounds is None else self.layer_bound().to(dtype)
        if isinstance(bound, float) and bound == 0.0:
            return sigmoid_log(z), None
        return bounded_sigmoid_log(z, bound), None


