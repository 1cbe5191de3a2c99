"""The shrink stage: s_t, the 'query' that reads the memory, y_t = m_tᵀ s_t."""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import Projection, key_scale, rotate
from lcsm.nn.oscillations import OscillationOut


class Shrink(nn.Module):
    """x [B,T,d] -> s [B,T,H,K], times a constant scale (rsqrt_k: K^-1/2), rotated with rotation."""

    def __init__(self, spec, d_model: int, H: int, K: int, bias: bool, rotated: bool):
        super().__init__()
        width = K // 2 if rotated else K
        self.proj = Projection(spec.resolved_source, d_model, H, width, spec.feature_map, spec.conv, bias, key_scale(spec, K),
                                   spec.norm)

    def forward(self, x: torch.Tensor, osc: OscillationOut, cache: dict | None = None) -> torch.Tensor:
        s = self.proj(x, cache)
        if osc.angles is not None:
            s = rotate(s, osc.angles)
        return s
