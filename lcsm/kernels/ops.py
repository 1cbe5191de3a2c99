"""The Triton recurrence as torch.library custom ops, so that torch.compile captures a whole model.

Under torch.compile (`torch.compiler.is_compiling()`), `lcsm.kernels.recurrence` and `step` call
these ops instead of the autograd Functions of triton/autograd.py: the compiler sees one opaque
node per call, with a fake (shape-only) implementation for tracing and the hand-written backward
registered as its derivative, and fuses everything around it. The torch backend needs no op: it is
plain torch code that the compiler traces. Outputs an op does not produce are empty tensors
(custom ops return tensors, not None).
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd

BT = 64  # the chunk length of the Triton kernels (triton/chunk.py)


def _none(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


def _empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


def _n(q: Tensor, cu_seqlens: Optional[Tensor]):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# --------------------------------------------------------------------------- chunked (separable decays)


@custom_op("lcsm::chunk_fwd", mutates_args=())
def chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor],
              h0: Optional[Tensor], cu_seqlens: Optional[Tensor], output_final_state: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, ht or empty, scores A or empty, o_strict or empty, the chunk states h, empty for packed
    sequences, whose number of chunks the fake cannot know); q, k, v contiguous, g not with gk."""
    from .triton.autograd import chunk_fwd as run

    o, ht, A, o_strict, h = run(q, k, v, g, gk, gv, h0, output_final_state, cu_seqlens)
    return o, _empty(ht, q), _empty(A, q), _empty(o_strict, q), (h if cu_seqlens is None else q.new_empty(0))


@chunk_fwd.register_fake
def _(q, k, v, g, gk, gv, h0, cu_seqlens, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    ht = q.new_empty(_n(q, cu_seqlens), H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0)
    A = q.new_empty(B, T, H, BT, **f32) if (gk is not None or gv is not None) else q.new_empty(0)
    o_strict = q.new_empty(B, T, H, V, **f32) if gv is not None else q.new_empty(0)
    from .triton.autograd import state_buffer_dtype

    h = (q.new_empty(B * ((T + BT - 1) // BT), H, K, V, dtype=state_buffer_dtype(q)) if cu_seqlens is None
         else q.new_empty(0))
    return q.new_empty(B, T, H, V), ht, A, o_strict, h


@custom_op("lcsm::chunk_bwd", mutates_args=())
def chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], h0: Optional[Tensor],
              A: Tensor, o_strict: Tensor, cu_seqlens: Optional[Tensor], do: Tensor, dht: Optional[Tensor],
              h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg, dgk, dgv, dh0), empty where the input is None; h empty: walked again."""
    from .triton.autograd import chunk_bwd as run

    dq, dk, dv, dg, dgk, dgv, dh0 = run(q, k, v, g, gk, gv, h0, _none(A), _none(o_strict), cu_seqlens, do.contiguous(), dht,
                                        _none(h))
    return dq, dk, dv, _empty(dg, q), _empty(dgk, q), _empty(dgv, q), _empty(dh0, q)


@chunk_bwd.register_fake
def _(q, k, v, g, gk, gv, h0, A, o_strict, cu_seqlens, do, dht, h):
    def like(x):
        return q.new_empty(0) if x is None else torch.empty_like(x)

    dh0 = q.new_empty(0) if h0 is None else torch.empty_like(h0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(g), like(gk), like(gv), dh0


def _chunk_setup(ctx, inputs, output):
    q, k, v, g, gk, gv, h0, cu_seqlens, _ = inputs
    ctx.save_for_backward(q, k, v, g, gk, gv, h0, output[2], output[3], cu_seqlens, output[4])
    ctx.has_ht = output[1].numel() > 0


def _chunk_backward(ctx, do, dht, dA, dstrict, dh):
    q, k, v, g, gk, gv, h0, A, o_strict, cu_seqlens, h = ctx.saved_tensors
    dht = dht if ctx.has_ht else None
    dq, dk, dv, dg, dgk, dgv, dh0 = chunk_bwd(q, k, v, g, gk, gv, h0, A, o_strict, cu_seqlens, do, dht, h)
    return (dq, dk, dv, _none_like(dg, g), _none_like(dgk, gk), _none_like(dgv, gv),
            None if h0 is None else dh0.to(h0.dtype), None, None)


def _none_like(d: Tensor, x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else d


register_autograd("lcsm::chunk_fwd", _chunk_backward, setup_context=_chunk_setup)


# --------------------------------------------------------------------------- scan (any decay)


@custom_op("lcsm::scan_fwd", mutates_args=())
def scan_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], dt: Optional[Tensor],
             A: Optional[Tensor], h0: Optional[Tensor], cu_seqlens: Optional[Tensor], output_final_state: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, ht or empty, the block-start states the backward reads)."""
    from .triton.autograd import scan_fwd as run

    y, ht, states = run(q, k, v, g, gk, gv, dt, A, h0, output_final_state, cu_seqlens, store_states=True)
    return y, _empty(ht, q), states


@scan_fwd.register_fake
def _(q, k, v, g, gk, gv, dt, A, h0, cu_seqlens, output_final_state):
    from .triton.autograd import BS

    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _n(q, cu_seqlens)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0)
    # the block count of a packed batch depends on the lengths: an unbacked size for the tracer
    blocks = B * ((T + BS - 1) // BS) if cu_seqlens is None else torch.library.get_ctx().new_dynamic_size()
    return q.new_empty(B, T, H, V), ht, q.new_empty(blocks, H, K, V, dtype=torch.float32)


@custom_op("lcsm::scan_bwd", mutates_args=())
def scan_bwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], dt: Optional[Tensor],
             A: Optional[Tensor], states: Tensor, cu_seqlens: Optional[Tensor], dy: Tensor, dht: Optional[Tensor], with_dh0: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton.autograd import scan_bwd as run

    grads = run(q, k, v, g, gk, gv, dt, A, states, cu_seqlens, dy, dht, with_dh0)
    return tuple(_empty(x, q) for x in grads)


@scan_bwd.register_fake
def _(q, k, v, g, gk, gv, dt, A, states, cu_seqlens, dy, dht, with_dh0):
    def like(x):
        return q.new_empty(0) if x is None else torch.empty_like(x)

    B, T, H, K = q.shape
    dh0 = q.new_empty(_n(q, cu_seqlens), H, K, v.shape[-1], dtype=torch.float32) if with_dh0 else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(g), like(gk), like(gv), like(dt), like(A), dh0)


def _scan_setup(ctx, inputs, output):
    q, k, v, g, gk, gv, dt, A, h0, cu_seqlens, _ = inputs
    ctx.save_for_backward(q, k, v, g, gk, gv, dt, A, output[2], cu_seqlens)
    ctx.has_ht = output[1].numel() > 0
    ctx.h0_dtype = None if h0 is None else h0.dtype


def _scan_backward(ctx, dy, dht, dstates):
    q, k, v, g, gk, gv, dt, A, states, cu_seqlens = ctx.saved_tensors
    grads = scan_bwd(q, k, v, g, gk, gv, dt, A, states, cu_seqlens, dy, dht if ctx.has_ht else None, ctx.h0_dtype is not None)
    dq, dk, dv, dg, dgk, dgv, ddt, dA, dh0 = grads
    return (dq, dk, dv, _none_like(dg, g), _none_like(dgk, gk), _none_like(dgv, gv), _none_like(ddt, dt),
            _none_like(dA, A), None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype), None, None)


register_autograd("lcsm::scan_fwd", _scan_backward, setup_context=_scan_setup)


# --------------------------------------------------------------------------- the delta rule


def _delta_setup_layout(q, cu_seqlens, g, gk):
    from .decay import Decay
    from .triton.autograd import Gates, Layout
    from .triton.delta_autograd import BT as DBT

    lay = Layout(q.shape[0], q.shape[1], cu_seqlens, q.device, block=DBT)
    decay = Decay(g=g, gk=gk)
    return lay, decay, Gates(decay, lay)


@custom_op("lcsm::delta_fwd", mutates_args=())
def delta_fwd(q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], g: Optional[Tensor], gk: Optional[Tensor],
              beta: Optional[Tensor], h0: Optional[Tensor], cu_seqlens: Optional[Tensor], output_final_state: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(o, ht or empty, T = (I + A)⁻¹ per chunk (dtype: solve_config), which the backward reads); g not with gk.
    With beta [B,T,H] (w None): write key β k, removal key k (fla's form, delta_autograd.py)."""
    from .triton.delta_autograd import delta_forward

    lay, _, gates = _delta_setup_layout(q, cu_seqlens, g, gk)
    h0 = None if h0 is None else h0.float().contiguous()
    o, ht, Tm = delta_forward(q, k, v, w, gates, h0, lay, store_ht=output_final_state, beta=beta)
    return o, _empty(ht, q), Tm


@delta_fwd.register_fake
def _(q, k, v, w, g, gk, beta, h0, cu_seqlens, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    ht = q.new_empty(_n(q, cu_seqlens), H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0)
    from .triton.delta_autograd import solve_config

    return q.new_empty(B, T, H, V), ht, q.new_empty(B, T, H, BT, dtype=solve_config(k)[0])


@custom_op("lcsm::delta_bwd", mutates_args=())
def delta_bwd(q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], g: Optional[Tensor], gk: Optional[Tensor],
              beta: Optional[Tensor], h0: Optional[Tensor], Tm: Tensor, cu_seqlens: Optional[Tensor], do: Tensor,
              dht: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dw, dg, dgk, dbeta, dh0), empty where the input is None."""
    from .triton.delta_autograd import delta_backward, keyed_backward

    lay, decay, gates = _delta_setup_layout(q, cu_seqlens, g, gk)
    h0f = None if h0 is None else h0.float().contiguous()
    dht = None if dht is None else dht.float().contiguous()
    if beta is None:
        dq, dk, dv, dw, dh0, dG, _ = delta_backward(q, k, v, w, do.contiguous(), dht, gates, h0f, Tm, lay)
        dbeta = q.new_empty(0)
    else:
        dq, dk, dv, dbeta, dh0, dG = keyed_backward(q, k, v, beta, do.contiguous(), dht, gates, h0f, Tm, lay)
        dbeta, dw = dbeta.to(beta.dtype), q.new_empty(0)
    dgs = []
    for name, x in (("g", g), ("gk", gk)):
        if x is None:
            dgs.append(q.new_empty(0))
        else:
            dgs.append((dG.sum((0, 1)) if decay.is_static(name) else dG).to(x.dtype))
    return dq, dk, dv, dw, dgs[0], dgs[1], dbeta, _empty(dh0, q)


@delta_bwd.register_fake
def _(q, k, v, w, g, gk, beta, h0, Tm, cu_seqlens, do, dht):
    def like(x):
        return q.new_empty(0) if x is None else torch.empty_like(x)

    dh0 = q.new_empty(0) if h0 is None else torch.empty_like(h0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(w), like(g), like(gk), like(beta), dh0


def _delta_setup(ctx, inputs, output):
    q, k, v, w, g, gk, beta, h0, cu_seqlens, _ = inputs
    ctx.save_for_backward(q, k, v, w, g, gk, beta, h0, output[2], cu_seqlens)
    ctx.has_ht = output[1].numel() > 0


def _delta_backward(ctx, do, dht, dTm):
    q, k, v, w, g, gk, beta, h0, Tm, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dw, dg, dgk, dbeta, dh0 = delta_bwd(q, k, v, w, g, gk, beta, h0, Tm, cu_seqlens, do,
                                                    dht if ctx.has_ht else None)
    return (dq, dk, dv, _none_like(dw, w), _none_like(dg, g), _none_like(dgk, gk), _none_like(dbeta, beta),
            None if h0 is None else dh0.to(h0.dtype), None, None)


register_autograd("lcsm::delta_fwd", _delta_backward, setup_context=_delta_setup)


def delta(q, k, v, w, g, gk, h0, cu_seqlens, output_final_state: bool, beta=None):
    """The delta-rule op with g folded into gk when both are given: (y, ht or empty). With beta
    [B,T,H] w must be None: fla's form (write key β k, removal key k)."""
    from .decay import Decay

    d = Decay(g=g, gk=gk).fold_scalar()
    w = None if w is None else w.contiguous()
    beta = None if beta is None else beta.contiguous()
    y, ht, _ = delta_fwd(q, k, v, w, d.g, d.gk, beta, h0, cu_seqlens, output_final_state)
    return y, ht


# --------------------------------------------------------------------------- one token


@custom_op("lcsm::step", mutates_args=())
def step(s: Tensor, e: Tensor, i: Tensor, state: Tensor, g: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor],
         dt: Optional[Tensor], A: Optional[Tensor], w: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y [B,H,V], the new state [B,H,K,V] fp32): functional, the input state is left as it was."""
    from .decay import Decay
    from .triton.step import eos_step_triton

    decay = Decay(g=g, gk=gk, gv=gv, dt=dt, A=A, w=w, step=True)
    y, new = eos_step_triton(s, e, i, state.float().contiguous().clone(), decay)
    return y, new


@step.register_fake
def _(s, e, i, state, g, gk, gv, dt, A, w):
    B, H, K = s.shape
    return s.new_empty(B, H, i.shape[-1]), state.new_empty(state.shape, dtype=torch.float32)
