"""Normalisation layers shared by the blocks and the mixers' output stage."""

from __future__ import annotations

import torch.nn as nn


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """rmsnorm or layernorm over the last `dim` features."""
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)
