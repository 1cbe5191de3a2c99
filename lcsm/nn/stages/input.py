"""The input stage: i_t, the 'value' written into the memory."""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import Projection
from lcsm.nn.oscillations import OscillationOut


class Input(nn.Module):
    """x [B,T,d] -> (i [B,T,H,V], the same before the Δ scaling, for the skip term)."""

    def __init__(self, spec, d_model: int, H: int, V: int, bias: bool):
        super().__init__()
        self.scale_by = spec.scale_by
        self.proj = Projection("data", d_model, H, V, spec.feature_map, spec.conv, bias)

    def forward(self, x: torch.Tensor, osc: OscillationOut, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.proj(x, cache)
        if self.scale_by != "dt":
            return i, i
        delta = osc.delta  # Mamba: Δ_t ⊙ x_t; Δ per head ([B,T,H] / [H]) or along V
        if delta.dim() in (1, 3):
            delta = delta[..., None]
        return i * delta.to(i.dtype), i
