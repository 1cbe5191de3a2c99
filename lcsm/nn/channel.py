"""Channel mixers and their registry: GLU (SwiGLU with silu), MLP, none, and the mixture of experts
(lcsm/nn/moe.py). `CHANNEL_MIXERS` maps each spec `kind` to its builder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm.nn.fused import swiglu

from lcsm.nn.moe import MoE

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": lambda x: x}


def round_hidden(d_model: int, ratio: float, multiple: int = 8) -> int:
    return max(multiple, int(round(d_model * ratio / multiple)) * multiple)


class GLU(nn.Module):
    """x [...,d] -> W_down(act(W_gate x) ⊙ W_up x)."""

    def __init__(self, spec, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or round_hidden(d_model, spec.hidden_ratio)
        self.act = ACTIVATIONS[spec.activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        if self.act is F.silu:
            # one GEMM for both projections (x is read and kept once) and a SwiGLU that keeps
            # only its inputs for the backward
            a, b = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
            return self.down_proj(swiglu(a, b))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """x [...,d] -> W_down act(W_up x)."""

    def __init__(self, spec, d_model: int):
        super().__init__()
        hidden = round_hidden(d_model, spec.hidden_ratio)
        self.act = ACTIVATIONS[spec.activation]
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


def _moe(spec, d_model: int) -> nn.Module:
    hidden = spec.hidden_size or round_hidden(d_model, spec.hidden_ratio)  # hidden_size: exact (upcycled experts)
    shared = GLU(spec, d_model, spec.shared_hidden_size or hidden) if spec.shared_expert else None
    return MoE(spec, d_model, hidden, ACTIVATIONS[spec.activation], shared)


CHANNEL_MIXERS = {"glu": GLU, "mlp": MLP, "moe": _moe, "none": lambda spec, d_model: None}


def build_channel_mixer(spec, d_model: int) -> nn.Module | None:
    """The channel mixer of a block (None for kind none)."""
    return CHANNEL_MIXERS[spec.kind](spec, d_model)
