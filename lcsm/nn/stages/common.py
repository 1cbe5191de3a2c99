"""Pieces the stages share: feature maps, projections, the short causal convolution, rotations."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm import parallel
from lcsm.nn.cache import store
from lcsm.nn.packing import current as packing
from lcsm.parallel.context import previous_tail


def _elu(x: torch.Tensor) -> torch.Tensor:
    """F.elu; under torch.compile written out, since AOTAutograd's backward graph views elu's
    gradient as contiguous when it is not (a stride error at run time, torch 2.13 on the CPU).
    The exponent is clamped so that the branch not taken cannot overflow (inf·0 in the backward)."""
    if torch.compiler.is_compiling():
        return torch.where(x > 0, x, torch.expm1(x.clamp(max=0)))
    return F.elu(x)


FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "elu_plus_one": lambda x: 1.0 + _elu(x),
    "silu": F.silu,
    "elu": _elu,
    "relu_squared": lambda x: F.relu(x) ** 2,
    "square": lambda x: x * x,
}


def keep_constant(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """owner.<name> = value, an fp64 constant kept outside the module's buffers (model.half() must
    not round it); on_device hands out its copies."""
    setattr(owner, name, value)
    owner._on_device = {}  # a plain attribute made here: torch.compile traces reads and writes of it


def on_device(owner: nn.Module, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """owner.<name> (kept by keep_constant) on x's device in `dtype`, copied once per device and
    dtype: no host-to-device copy per call (a captured decoding step has none)."""
    memo = owner._on_device
    key = (name, str(x.device), dtype)
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
        pk = packing()
        if pk is not None and cache is None:
            return self.packed(x, pk.positions)
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

    def packed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed documents: x [1,N,C], positions [N] within each document. The tap of lag l reads
        x_{t-l} only where l <= position_t, so no document sees the end of the one before it (the
        zero padding of a document run alone). A sum over the size taps, as conv1d computes it."""
        N, n = x.shape[1], self.size - 1
        w = self.conv.weight[:, 0, :].to(x.dtype)  # [C, size]: out_t = sum_lag w[:, n-lag] x_{t-lag}
        xp = F.pad(x, (0, 0, n, 0))
        y = x * w[:, n]
        for lag in range(1, n + 1):
            reach = (positions >= lag).to(x.dtype)[None, :, None]
            y = y + xp[:, n - lag : n - lag + N] * w[:, n - lag] * reach
        return y if self.conv.bias is None else y + self.conv.bias.to(x.dtype)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[x cos θ_t, x sin θ_t]: [B,T,H,K/2] with angles [T,K/2] -> [B,T,H,K]."""
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    return torch.cat([x * cos.to(x.dtype), x * sin.to(x.dtype)], dim=-1)


def key_scale(spec, K: int) -> float:
    """The constant an expand or shrink stage is multiplied by: none, rsqrt_k (K^-1/2) or a number."""
    return {"none": 1.0, "rsqrt_k": K**-0.5}.get(spec.scale, spec.scale)


def l2_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h / sqrt(Σ h² + eps) over the last axis (fla's l2norm), computed in fp32 for half types."""
    x = h.float() if h.dtype in (torch.bfloat16, torch.float16) else h
    return (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)).to(h.dtype)


class Projection(nn.Module):
    """x [B,T,d] -> [B,T,H,D]: a linear map, an optional short convolution, a feature map, an
    optional L2 normalisation per head, a scale.

    source data projects x; param is a learned [H,D] vector for every token; fixed is all ones.
    The result is multiplied by `scale` (e.g. K^-1/2).
    """

    def __init__(self, source: str, d_model: int, H: int, D: int, feature_map: str, conv: int | None, bias: bool,
                 scale: float = 1.0, norm: str = "none"):
        super().__init__()
        self.source, self.H, self.D, self.scale = source, H, D, scale
        self.l2 = norm == "l2"
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
        return self.finish(h)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """The normalisation and the scale, on [..., H, D] after the feature map."""
        if self.l2:
            h = l2_normalize(h)
        return h * self.scale if self.scale != 1.0 else h
