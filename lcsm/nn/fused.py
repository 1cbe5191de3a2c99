"""Small fused functions of the model path that keep fewer activations for the backward.

Autograd through `W(silu(a) * b)` keeps a, silu(a), b and the product; through `rmsnorm(y) * act(g)`
it keeps y, the normalised y, act(g) and the product's inputs; through `log(b + (1-b)σ(z.float()))`
it keeps fp32 copies of z, σ(z) and the sum. These functions keep only their inputs (and a norm's
statistics) and recompute the rest in the backward: a few elementwise passes, for a third to a half
less activation memory in every block (docs/benchmarks.md measures it per block). They compute in
fp32 inside and return the input dtype (the decay gates: fp32 log decays), like torch's fused norm
kernels. On a GPU each pointwise forward and backward is compiled (torch.compile) into one kernel;
on the CPU they run as written.

  act_linear           a channel mixer's activation (GLU or plain) and down projection
  gated_norm           the output norm (RMSNorm or LayerNorm) and gate, if any, of a token mixer
  gated_norm_linear    the same with the token mixer's output projection
  sigmoid_log          log σ(z)/τ (GLA's gate)
  bounded_sigmoid_log  log(b + (1-b)σ(z)) (HGRN2's lower-bounded gate)
  one_minus_exp        1 - o from log o (HGRN2's tied key)
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


def _dsigmoid(a: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(a)
    return s * (1 - s)


def _dgelu(a: torch.Tensor) -> torch.Tensor:  # d/da a·Φ(a) = Φ(a) + a·φ(a), the exact (erf) GELU
    return 0.5 * (1 + torch.erf(a * 0.7071067811865476)) + a * torch.exp(-0.5 * a * a) * 0.3989422804014327


# name -> (activation, its derivative); the channel mixers' and output gates' names
ACTS = {
    "silu": (F.silu, _dsilu),
    "sigmoid": (torch.sigmoid, _dsigmoid),
    "gelu": (F.gelu, _dgelu),
    "relu": (F.relu, lambda a: (a > 0).to(a.dtype)),
    "identity": (lambda a: a, torch.ones_like),
}


# --------------------------------------------------------------------------- activation + projection

_ACT_LINEAR = {}  # (act, gated) -> (forward, backward) of the pointwise part, each compiled on the GPU


def _act_fns(act: str, gated: bool):
    key = (act, gated)
    if key not in _ACT_LINEAR:
        f, df = ACTS[act]
        if gated:
            def fwd(a, b):
                return (f(_up(a)) * _up(b)).to(a.dtype)

            def bwd(a, b, dh):  # (da, db, the recomputed act(a) ⊙ b)
                af, bf, gf = _up(a), _up(b), _up(dh)
                fa = f(af)
                return (gf * bf * df(af)).to(a.dtype), (gf * fa).to(b.dtype), (fa * bf).to(a.dtype)
        else:
            def fwd(a):
                return f(_up(a)).to(a.dtype)

            def bwd(a, dh):
                af = _up(a)
                return (_up(dh) * df(af)).to(a.dtype), f(af).to(a.dtype)
        _ACT_LINEAR[key] = (gpu_compiled(fwd), gpu_compiled(bwd))
    return _ACT_LINEAR[key]


class _ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weight, act: str):
        fwd, _ = _act_fns(act, b is not None)
        h = fwd(a) if b is None else fwd(a, b)
        ctx.save_for_backward(a, b, weight)
        ctx.act = act
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad):
        a, b, weight = ctx.saved_tensors
        _, bwd = _act_fns(ctx.act, b is not None)
        dh = grad.matmul(weight)
        if b is None:
            (da, h), db = bwd(a, dh), None
        else:
            da, db, h = bwd(a, b, dh)
        dw = grad.reshape(-1, grad.shape[-1]).t().matmul(h.reshape(-1, h.shape[-1]))
        return da, db, dw, None


def act_linear(a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """(act(a) ⊙ b) Wᵀ, or act(a) Wᵀ without b: a channel mixer's activation and down projection.
    a, b [..., n], weight [d, n] in a's dtype (cast it first under autocast) -> [..., d].

    Keeps a, b and W for the backward and recomputes act(a) ⊙ b there: the [..., n] product the
    projection would keep for its weight gradient is never stored (n = hidden width, the widest
    activation of a block)."""
    return _ActLinear.apply(a, b, weight, act)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b, keeping only a and b for the backward (for callers with no projection after)."""
    return _Swiglu.apply(a, b)


class _Swiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _act_fns("silu", True)[0](a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        da, db, _ = _act_fns("silu", True)[1](a, b, grad)
        return da, db


# --------------------------------------------------------------------------- gated output norm


def _normalise(x, eps: float, layer: bool):
    """(x̂, mean or None, rstd) over the last axis: RMSNorm's or LayerNorm's statistics."""
    mean = x.mean(-1, keepdim=True) if layer else None
    xc = x - mean if layer else x
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return xc * rstd, mean, rstd


def _gated_norm_fwd(y, weight, bias, g, eps: float, act: str | None, gate_first: bool, layer: bool):
    """act None: no gate (g is None)."""
    yf = _up(y)
    gate = None if act is None else ACTS[act][0](_up(g))
    x = yf * gate if gate is not None and gate_first else yf
    xhat, mean, rstd = _normalise(x, eps, layer)
    out = xhat * weight.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    if gate is not None and not gate_first:
        out = out * gate
    return out.to(y.dtype), (rstd if mean is None else torch.cat([mean, rstd], -1))


def _gated_norm_bwd(y, weight, bias, g, stats, grad, act: str, gate_first: bool, layer: bool, want_out: bool = False):
    """(dy, dw, db, dg) and with want_out also the recomputed forward output (for a projection's
    weight gradient). act None: no gate (dg None)."""
    yf, go = _up(y), _up(grad)
    w = weight.to(yf.dtype)
    if act is None:
        gate_first, gate = True, None  # the gate-first formulas with a gate of one
    else:
        f, df = ACTS[act]
        gf = _up(g)
        gate = f(gf)
    x = yf * gate if gate is not None and gate_first else yf
    mean, rstd = (stats[..., :1], stats[..., 1:]) if layer else (None, stats)
    xhat = (x - mean) * rstd if layer else x * rstd
    dn = go if gate_first else go * gate  # the gradient of x̂ ⊙ w + b
    dw = (dn * xhat).flatten(0, -2).sum(0)
    db = None if bias is None else dn.flatten(0, -2).sum(0).to(bias.dtype)
    dxhat = dn * w
    if layer:
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    else:
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    pre = xhat * w if bias is None else xhat * w + bias.to(yf.dtype)
    if gate is None:
        dy, dg = dx, None
    elif gate_first:
        dy, dg = dx * gate, dx * yf * df(gf)
    else:
        dy, dg = dx, go * pre * df(gf)
    grads = (dy.to(y.dtype), dw.to(weight.dtype), db, None if dg is None else dg.to(g.dtype))
    return (*grads, (pre if gate_first else pre * gate).to(y.dtype)) if want_out else grads


_GATED_NORM = {}  # (act, gate_first, layer) -> (forward, backward), each compiled on the GPU


def _gated_norm_fns(act: str, gate_first: bool, layer: bool, want_out: bool = False):
    key = (act, gate_first, layer, want_out)
    if key not in _GATED_NORM:
        _GATED_NORM[key] = (
            gpu_compiled(lambda y, w, b, g, eps: _gated_norm_fwd(y, w, b, g, eps, act, gate_first, layer)),
            gpu_compiled(lambda y, w, b, g, st, grad: _gated_norm_bwd(y, w, b, g, st, grad, act, gate_first, layer,
                                                                      want_out)),
        )
    return _GATED_NORM[key]


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, g, eps: float, act: str, gate_first: bool, layer: bool):
        act = None if g is None else act
        out, stats = _gated_norm_fns(act, gate_first, layer)[0](y, weight, bias, g, eps)
        ctx.save_for_backward(y, weight, bias, g, stats)
        ctx.act, ctx.gate_first, ctx.layer = act, gate_first, layer
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, g, stats = ctx.saved_tensors
        dy, dw, db, dg = _gated_norm_fns(ctx.act, ctx.gate_first, ctx.layer)[1](y, weight, bias, g, stats, grad)
        return dy, dw, db, dg, None, None, None, None


def gated_norm(y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor | None, eps: float, act: str = "silu",
               gate_first: bool = False, bias: torch.Tensor | None = None, layer: bool = False) -> torch.Tensor:
    """norm(y)·w (+ b) ⊙ act(g), or norm(y ⊙ act(g))·w (+ b) with gate_first (Mamba2's gated norm),
    over the last axis; norm is RMSNorm, or LayerNorm with layer. y, g [..., D], weight and bias [D];
    g None: the norm alone.
    Keeps y, g, w, b and the statistics (the reciprocal RMS; with layer also the mean) for the backward."""
    return _GatedNorm.apply(y, weight, bias, g, eps, act, gate_first, layer)


class _GatedNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, g, proj, eps: float, act: str, gate_first: bool, layer: bool, lead: int):
        act = None if g is None else act
        out, stats = _gated_norm_fns(act, gate_first, layer)[0](y, weight, bias, g, eps)
        ctx.save_for_backward(y, weight, bias, g, stats, proj)
        ctx.args = (act, gate_first, layer)
        return F.linear(out.flatten(lead), proj)

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, g, stats, proj = ctx.saved_tensors
        dout = grad.matmul(proj).view(y.shape)
        dy, dw, db, dg, out = _gated_norm_fns(*ctx.args, True)[1](y, weight, bias, g, stats, dout)
        dproj = grad.reshape(-1, grad.shape[-1]).t().matmul(out.reshape(grad.numel() // grad.shape[-1], -1))
        return dy, dw, db, dg, dproj, None, None, None, None, None


def gated_norm_linear(y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor | None, proj: torch.Tensor, eps: float,
                      act: str = "silu", gate_first: bool = False, bias: torch.Tensor | None = None,
                      layer: bool = False, lead: int = 2) -> torch.Tensor:
    """gated_norm(y, ...) flattened from dim `lead` on and projected by proj [d, n] (in y's dtype;
    cast it first under autocast): a token mixer's output norm, gate and output projection.
    y, g [*lead dims, ..., D] -> [*lead dims, d]. Keeps what gated_norm keeps and proj; the gated
    output, which the projection would keep for its weight gradient, is recomputed in the backward."""
    return _GatedNormLinear.apply(y, weight, bias, g, proj, eps, act, gate_first, layer, lead)


def gated_rms_norm(y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, eps: float, act: str = "silu",
                   gate_first: bool = False) -> torch.Tensor:
    """gated_norm with RMSNorm (kept for callers of the first name)."""
    return gated_norm(y, weight, g, eps, act, gate_first)


# --------------------------------------------------------------------------- decay gates


def _sigmoid_log_fwd(z, tau: float):
    return F.logsigmoid(_up(z)) / tau


def _sigmoid_log_bwd(z, grad, tau: float):
    return (grad * torch.sigmoid(-_up(z)) / tau).to(z.dtype)


def _bounded_fwd(z, bound):
    return torch.log(bound + (1 - bound) * torch.sigmoid(_up(z)))


def _bounded_bwd(z, bound, grad):  # bound a tensor: (dz, db summed to b's shape)
    s = torch.sigmoid(_up(z))
    q = grad / (bound + (1 - bound) * s)
    return (q * (1 - bound) * s * (1 - s)).to(z.dtype), (q * (1 - s)).sum_to_size(bound.shape).to(bound.dtype)


def _bounded_const_bwd(z, bound: float, grad):  # bound a number: dz
    s = torch.sigmoid(_up(z))
    return (grad * (1 - bound) * s * (1 - s) / (bound + (1 - bound) * s)).to(z.dtype)


_GATE_FNS = {
    "sigmoid": (gpu_compiled(_sigmoid_log_fwd), gpu_compiled(_sigmoid_log_bwd)),
    "bounded": (gpu_compiled(_bounded_fwd), gpu_compiled(_bounded_bwd)),
    "bounded_const": (None, gpu_compiled(_bounded_const_bwd)),
}


class _SigmoidLog(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tau: float):
        ctx.save_for_backward(z)
        ctx.tau = tau
        return _GATE_FNS["sigmoid"][0](z, tau)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return _GATE_FNS["sigmoid"][1](z, grad, ctx.tau), None


def sigmoid_log(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """log σ(z) / τ in fp32 (fp64 stays fp64), keeping z in its own dtype (a bf16 projection's
    output) for the backward instead of an fp32 copy; z [...] -> [...]."""
    return _SigmoidLog.apply(z, tau)


class _BoundedSigmoidLog(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, bound):
        ctx.const = None if isinstance(bound, torch.Tensor) else float(bound)
        ctx.save_for_backward(z, bound) if ctx.const is None else ctx.save_for_backward(z)
        return _GATE_FNS["bounded"][0](z, bound)

    @staticmethod
    def backward(ctx, grad):
        if ctx.const is not None:
            (z,) = ctx.saved_tensors
            return _GATE_FNS["bounded_const"][1](z, ctx.const, grad), None
        z, bound = ctx.saved_tensors
        dz, db = _GATE_FNS["bounded"][1](z, bound, grad)
        return dz, (db if ctx.needs_input_grad[1] else None)


def bounded_sigmoid_log(z: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """log(b + (1 - b) σ(z)) in fp32 (HGRN2's lower-bounded forget gate), z [..., *dims] in its own
    dtype, b a number or a tensor broadcastable to z (e.g. [*dims], may need its gradient). Keeps z
    and b only: the sigmoid and the bounded sum are recomputed in the backward."""
    return _BoundedSigmoidLog.apply(z, bound)


def _one_minus_exp_fwd(log_o, dtype: torch.dtype):
    return (-torch.expm1(log_o)).to(dtype)


def _one_minus_exp_bwd(log_o, grad):
    return (-_up(grad) * torch.exp(log_o)).to(log_o.dtype)


_ONE_MINUS_EXP = (gpu_compiled(_one_minus_exp_fwd), gpu_compiled(_one_minus_exp_bwd))


class _OneMinusExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_o, dtype: torch.dtype):
        ctx.save_for_backward(log_o)
        return _ONE_MINUS_EXP[0](log_o, dtype)

    @staticmethod
    def backward(ctx, grad):
        (log_o,) = ctx.saved_tensors
        return _ONE_MINUS_EXP[1](log_o, grad), None


def one_minus_exp(log_o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 - exp(log o) in `dtype` (HGRN2's key tied to its forget gate), keeping only log o for the
    backward (the recurrence keeps the same tensor as its decay, so nothing new is stored)."""
    return _OneMinusExp.apply(log_o, dtype)
