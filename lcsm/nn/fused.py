"""Small fused functions of the model path that keep fewer activations for the backward.

Autograd through `silu(a) * b` keeps a, silu(a) and b; through `rmsnorm(y) * act(g)` it keeps y,
the normalised y, act(g) and the product's inputs. These functions keep only their inputs (and the
norm's reciprocal RMS) and recompute the rest in the backward: a few elementwise passes for about a
third less activation memory in every block. They compute in fp32 inside and return the input
dtype, like torch's fused norm kernels. On a GPU each forward and backward is compiled (torch.compile)
into one kernel; on the CPU they run as written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gpu_compiled(fn):
    """fn, compiled by torch.compile into one fused kernel when it runs on a GPU (eager elementwise
    ops would each read and write the whole tensor); plain on the CPU and inside a compiled graph."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if args[0].is_cuda and not torch.compiler.is_compiling():
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(*args)
        return fn(*args)

    return call


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _dsilu(a: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


@gpu_compiled
def _swiglu_fwd(a, b):
    return F.silu(a) * b


@gpu_compiled
def _swiglu_bwd(a, b, grad):
    af, bf, gf = _up(a), _up(b), _up(grad)
    return (gf * bf * _dsilu(af)).to(a.dtype), (gf * F.silu(af)).to(b.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _swiglu_bwd(a, b, grad)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, keeping only a and b for the backward."""
    return _SwiGLU.apply(a, b)


ACTS = {"silu": (F.silu, _dsilu), "sigmoid": (torch.sigmoid, lambda g: torch.sigmoid(g) * (1 - torch.sigmoid(g)))}


def _gated_norm_fwd(y, weight, g, eps: float, act: str, gate_first: bool):
    yf = _up(y)
    gate = ACTS[act][0](_up(g))
    x = yf * gate if gate_first else yf
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = x * rstd * weight.to(x.dtype)
    if not gate_first:
        out = out * gate
    return out.to(y.dtype), rstd


def _gated_norm_bwd(y, weight, g, rstd, grad, act: str, gate_first: bool):
    f, df = ACTS[act]
    yf, gf, go = _up(y), _up(g), _up(grad)
    w = weight.to(yf.dtype)
    gate = f(gf)
    x = yf * gate if gate_first else yf
    xhat = x * rstd
    dn = go if gate_first else go * gate  # the gradient of xhat ⊙ w
    dw = (dn * xhat).flatten(0, -2).sum(0)
    dxhat = dn * w
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if gate_first:
        dy, dg = dx * gate, dx * yf * df(gf)
    else:
        dy, dg = dx, go * xhat * w * df(gf)
    return dy.to(y.dtype), dw.to(weight.dtype), dg.to(g.dtype)


_GATED_NORM = {}  # (act, gate_first) -> (forward, backward), each compiled on the GPU


def _gated_norm_fns(act: str, gate_first: bool):
    key = (act, gate_first)
    if key not in _GATED_NORM:
        _GATED_NORM[key] = (
            gpu_compiled(lambda y, w, g, eps: _gated_norm_fwd(y, w, g, eps, act, gate_first)),
            gpu_compiled(lambda y, w, g, rstd, grad: _gated_norm_bwd(y, w, g, rstd, grad, act, gate_first)),
        )
    return _GATED_NORM[key]


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, g, eps: float, act: str, gate_first: bool):
        out, rstd = _gated_norm_fns(act, gate_first)[0](y, weight, g, eps)
        ctx.save_for_backward(y, weight, g, rstd)
        ctx.act, ctx.gate_first = act, gate_first
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weight, g, rstd = ctx.saved_tensors
        dy, dw, dg = _gated_norm_fns(ctx.act, ctx.gate_first)[1](y, weight, g, rstd, grad)
        return dy, dw, dg, None, None, None


def gated_rms_norm(y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, eps: float, act: str = "silu",
                   gate_first: bool = False) -> torch.Tensor:
    """rmsnorm(y)·w ⊙ act(g) (or rmsnorm(y ⊙ act(g))·w with gate_first, Mamba2's gated norm) over the
    last axis; y, g [..., D], weight [D]. Keeps y, g, w and the reciprocal RMS for the backward."""
    return _GatedRMSNorm.apply(y, weight, g, eps, act, gate_first)
