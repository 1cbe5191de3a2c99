"""Normalisation layers shared by the blocks and the mixers' output stage.

Under bf16 autocast the activations reaching a norm may be bf16 (a kernel's output) while the
weight is an fp32 parameter; torch's fused RMSNorm kernel needs one dtype and otherwise falls back
to a composite of small ops that keeps fp32 copies for the backward. These norms cast the weight
to the input's dtype first (the statistics are still accumulated in fp32 by the kernel).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter `weight`) with the weight in the input's dtype."""

    centres = False  # subtracts no mean (lcsm.nn.fused.gated_norm reads it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) with weight and bias in the input's dtype."""

    centres = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """rmsnorm or layernorm over the last `dim` features."""
    return RMSNorm(dim, eps=eps) if kind == "rmsnorm" else LayerNorm(dim, eps=eps)
