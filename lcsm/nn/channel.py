"""Channel mixers and their registry: GLU (SwiGLU with silu), MLP, none, and the mixture of experts
(lcsm/nn/moe.py). `CHANNEL_MIXERS` maps each spec `kind` to its builder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm.nn.fused import ACTS, act_linear

from lcsm.nn.moe import MoE

ACTIVATIONS = {name: ACTS[name][0] for name in ("silu", "gelu", "relu", "identity")}


def round_hidden(d_model: int, ratio: float, multiple: int = 8) -> int:
    return max(multiple, int(round(d_model * ratio / multiple)) * multiple)


class GLU(nn.Module):
    """x [...,d] -> W_down(act(W_gate x) ⊙ W_up x)."""

    def __init__(self, spec, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or round_hidden(d_model, spec.hidden_ratio)
        self.activation = spec.activation
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    # False: the down projection runs as its own module on the hidden activation, so that hooks on
    # down_proj see that activation (lcsm/run/upcycle.py's neuron statistics); same values
    fused = True

    def forward(self, x):
        # one GEMM for both projections (x is read and kept once); the activation, product and down
        # projection keep only the two halves for the backward (lcsm/nn/fused.py act_linear)
        a, b = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        if not self.fused:
            return self.down_proj(ACTS[self.activation][0](a) * b)
        return act_linear(a, b, self.down_proj.weight.to(a.dtype), self.activation)


class MLP(nn.Module):
    """x [...,d] -> W_down act(W_up x)."""

    def __init__(self, spec, d_model: int):
        super().__init__()
        hidden = round_hidden(d_model, spec.hidden_ratio)
        self.activation = spec.activation
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a = self.up_proj(x)
        return act_linear(a, None, self.down_proj.weight.to(a.dtype), self.activation)  # keeps a, not act(a)


def _moe(spec, d_model: int) -> nn.Module:
    hidden = spec.hidden_size or round_hidden(d_model, spec.hidden_ratio)  # hidden_size: exact (upcycled experts)
    shared = GLU(spec, d_model, spec.shared_hidden_size or hidden) if spec.shared_expert else None
    return MoE(spec, d_model, hidden, ACTIVATIONS[spec.activation], shared)


CHANNEL_MIXERS = {"glu": GLU, "mlp": MLP, "moe": _moe, "none": lambda spec, d_model: None}


def build_channel_mixer(spec, d_model: int) -> nn.Module | None:
    """The channel mixer of a block (None for kind none)."""
    return CHANNEL_MIXERS[spec.kind](spec, d_model)
