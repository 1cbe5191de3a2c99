"""Pieces the stages share: feature maps, the short causal convolution, hand-crafted slopes,
and the gate parametrisations that turn a pre-activation z into a log decay (<= 0)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm import parallel
from lcsm.cache import store
from lcsm.parallel.context import previous_tail

FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "elu_plus_one": lambda x: 1.0 + F.elu(x),
    "silu": F.silu,
    "elu": F.elu,
    "relu_squared": lambda x: F.relu(x) ** 2,
    "square": lambda x: x * x,
}


def on_device(owner: nn.Module, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """owner.<name> (an fp64 constant kept outside the buffers) on x's device in `dtype`, copied
    once per device and dtype: no host-to-device copy per call (a captured decoding step has none)."""
    memo = owner.__dict__.setdefault("_on_device", {})
    key = (name, x.device, dtype)
    if key not in memo:
        memo[key] = getattr(owner, name).to(device=x.device, dtype=dtype)
    return memo[key]


def gate_dtype(x: torch.Tensor) -> torch.dtype:
    """Log decays are fp32 (fp64 when the model runs in fp64, as in the tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ShortConv(nn.Module):
    """Depthwise causal convolution over time: [B,T,C] -> [B,T,C]; y_t = sum_j w_j x_{t-size+1+j}."""

    def __init__(self, channels: int, size: int, bias: bool = False):
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, bias=bias, padding=size - 1)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        T, n = x.shape[1], self.size - 1
        sp = parallel.current()
        if cache is None and sp is None:
            return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)
        if cache is None:
            # sequence parallel: the window of the first tokens reaches into the previous rank's slice
            x = torch.cat([previous_tail(x, n, sp), x], dim=1)
            return self.conv(x.transpose(1, 2))[..., n : n + T].transpose(1, 2)
        # decoding: the last size-1 inputs stand in for the zero padding (cache["conv"] [B,size-1,C])
        tail = cache.get("conv")
        if tail is None:
            tail = x.new_zeros(x.shape[0], n, x.shape[2])
        xx = torch.cat([tail.to(x.dtype), x], dim=1)
        store(cache, "conv", xx[:, xx.shape[1] - n :])
        return F.conv1d(xx.transpose(1, 2), self.conv.weight, self.conv.bias, groups=self.conv.groups).transpose(1, 2)


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

    def __init__(self, spec, d_model: int, dims: tuple[int, ...], layer_idx: int, n_layers: int, own_A: bool = True):
        super().__init__()
        self.own_A = own_A
        self.source, self.dims = spec.source, dims
        self.parametrization = None if spec.source == "fixed" else spec.parametrization
        self.tau = spec.tau
        self.lower_bound = spec.lower_bound
        n = math.prod(dims)
        H = dims[0]
        # data-independent gates start from the ALiBi decays (LCSM's note); per head, same along K/V
        target = fixed_log_decay(getattr(spec, "slopes", "alibi") if spec.source == "fixed" else "alibi", H, layer_idx, n_layers)
        target = target.view(H, *[1] * (len(dims) - 1)).expand(dims).clone()
        if spec.source == "fixed":
            # kept in fp64 outside the module's buffers, so that model.half() cannot round it
            self._fixed = target
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

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None = None):
        dtype = gate_dtype(x)
        if self.source == "fixed":
            return on_device(self, "_fixed", x, dtype), None
        if self.source == "param":
            z = self.z.to(dtype)
        else:
            z = self.proj(x).to(dtype).unflatten(-1, self.dims)
        return self.activate(z, lower_bound)

    def activate(self, z: torch.Tensor, lower_bound: torch.Tensor | None = None):
        if self.parametrization == "sigmoid_tau":
            return F.logsigmoid(z) / self.tau, None
        if self.parametrization == "exp_softplus":
            delta = F.softplus(z)
            return (-delta * torch.exp(self.A_log.to(z.dtype)) if self.own_A else -delta), delta
        # lower_bound: o = b + (1 - b) σ(z)
        bound = self.lower_bound if lower_bound is None else lower_bound.to(z.dtype).view(self.dims)
        if isinstance(bound, float) and bound == 0.0:
            return F.logsigmoid(z), None
        return torch.log(bound + (1 - bound) * torch.sigmoid(z)), None


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[x cos θ_t, x sin θ_t]: [B,T,H,K/2] with angles [T,K/2] -> [B,T,H,K]."""
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    return torch.cat([x * cos.to(x.dtype), x * sin.to(x.dtype)], dim=-1)


def key_scale(spec, K: int) -> float:
    """The constant an expand or shrink stage is multiplied by: none, rsqrt_k (K^-1/2) or a number."""
    return {"none": 1.0, "rsqrt_k": K**-0.5}.get(spec.scale, spec.scale)


class Projection(nn.Module):
    """x [B,T,d] -> [B,T,H,D]: a linear map, an optional short convolution, a feature map, a scale.

    source data projects x; param is a learned [H,D] vector for every token; fixed is all ones.
    The result is multiplied by `scale` (e.g. K^-1/2).
    """

    def __init__(self, source: str, d_model: int, H: int, D: int, feature_map: str, conv: int | None, bias: bool,
                 scale: float = 1.0):
        super().__init__()
        self.source, self.H, self.D, self.scale = source, H, D, scale
        self.feature_map = FEATURE_MAPS[feature_map]
        if source == "data":
            self.proj = nn.Linear(d_model, H * D, bias=bias)
            self.conv = ShortConv(H * D, conv, bias=bias) if conv else None
        elif source == "param":
            self.param = nn.Parameter(0.1 * torch.randn(H, D))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """cache: the stage's sub-dict while decoding (holds the short convolution's tail)."""
        B, T, _ = x.shape
        if self.source == "fixed":
            return x.new_full((B, T, self.H, self.D), self.scale)
        if self.source == "param":
            h = self.feature_map(self.param.to(x.dtype)).expand(B, T, self.H, self.D)
        else:
            h = self.proj(x)
            if self.conv is not None:
                h = self.conv(h, cache)
            h = self.feature_map(h).unflatten(-1, (self.H, self.D))
        return h * self.scale if self.scale != 1.0 else h
