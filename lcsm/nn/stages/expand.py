"""The expand stage: e_t, the 'key' that writes i_t into the memory."""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import Projection, key_scale, rotate
from lcsm.nn.fused import one_minus_exp
from lcsm.nn.oscillations import OscillationOut


class Expand(nn.Module):
    """x [B,T,d] -> e [B,T,H,K].

    Ties: one_minus_oscillation gives e = 1 - o along K (HGRN2, no key projection); the
    oscillation may also scale e (cumsoftmax) or rotate it (rotation, K/2 projected features).
    """

    def __init__(self, spec, d_model: int, H: int, K: int, bias: bool, rotated: bool):
        super().__init__()
        self.tie = spec.tie
        self.H, self.K = H, K
        if self.tie == "none":
            width = K // 2 if rotated else K
            self.proj = Projection(spec.resolved_source, d_model, H, width, spec.feature_map, spec.conv, bias, key_scale(spec, K),
                                   spec.norm)

    def forward(self, x: torch.Tensor, osc: OscillationOut, cache: dict | None = None) -> torch.Tensor:
        if self.tie == "one_minus_oscillation":
            B, T, _ = x.shape
            e = one_minus_exp(osc.log_k, x.dtype).expand(B, T, self.H, self.K)
        else:
            e = self.proj(x, cache)
        if osc.angles is not None:
            e = rotate(e, osc.angles)
        if osc.expand_scale is not None:
            e = e * osc.expand_scale.to(e.dtype)
        return e
