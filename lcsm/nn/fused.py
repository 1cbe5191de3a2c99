"""Small fused functions of the model path that keep fewer activations for the backward.

Autograd through `silu(a) * b` keeps a, silu(a) and b; through `rmsnorm(y) * act(g)` it keeps y,
the normalised y, act(g) and the product's inputs. These functions keep only their inputs (and the
norm's reciprocal RMS) and recompute the rest in the backward: a few elementwise passes for about a
third less activation memory in every block. They compute in fp32 inside and return the input
dtype, like torch's fused norm kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _dsilu(a: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        af, bf, gf = _up(a), _up(b), _up(grad)
        return (gf * bf * _dsilu(af)).to(a.dtype), (gf * F.silu(af)).to(b.dtype)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, keeping only a and b for the backward."""
    return _SwiGLU.apply(a, b)


ACTS = {"silu": (F.silu, _dsilu), "sigmoid": (torch.sigmoid, lambda g: torch.sigmoid(g) * (1 - torch.sigmoid(g)))}


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, g, eps: float, act: str, gate_first: bool):
        yf = _up(y)
        gate = ACTS[act][0](_up(g))
        x = yf * gate if gate_first else yf
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = x * rstd * weight.to(x.dtype)
        if not gate_first:
            out = out * gate
        ctx.save_for_backward(y, weight, g, rstd)
        ctx.act, ctx.gate_first = act, gate_first
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, weight, g, rstd = ctx.saved_tensors
        f, df = ACTS[ctx.act]
        yf, gf, go = _up(y), _up(g), _up(grad)
        w = weight.to(yf.dtype)
        gate = f(gf)
        x = yf * gate if ctx.gate_first else yf
        xhat = x * rstd
        if ctx.gate_first:
            dn = go  # out = xhat ⊙ w
        else:
            dn = go * gate  # out = (xhat ⊙ w) ⊙ gate
        dw = (dn * xhat).flatten(0, -2).sum(0)
        dxhat = dn * w
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        if ctx.gate_first:
            dy = dx * gate
            dg = dx * yf * df(gf)
        else:
            dy = dx
            dg = go * xhat * w * df(gf)
        return dy.to(y.dtype), dw.to(weight.dtype), dg.to(g.dtype), None, None, None


def gated_rms_norm(y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, eps: float, act: str = "silu",
                   gate_first: bool = False) -> torch.Tensor:
    """rmsnorm(y)·w ⊙ act(g) (or rmsnorm(y ⊙ act(g))·w with gate_first, Mamba2's gated norm) over the
    last axis; y, g [..., D], weight [D]. Keeps y, g, w and the reciprocal RMS for the backward."""
    return _GatedRMSNorm.apply(y, weight, g, eps, act, gate_first)
