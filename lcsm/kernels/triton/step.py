"""A fused one-token step of the recurrence for decoding (the state is updated in place):
m = exp(log o) ⊙ m + e iᵀ, or with a removal key w (the delta rule) m = (I - w eᵀ)(exp(log o) ⊙ m) + e iᵀ."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..decay import Decay
from .autograd import decay_flags


@triton.jit
def step_kernel(q, k, v, state, y, g, gk, gv, dt, A, w,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
                USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, USE_DT: tl.constexpr, A_MODE: tl.constexpr,
                USE_W: tl.constexpr):
    """One program per (batch·head, V tile) holding all of K: m = exp(log o) ⊙ m + e iᵀ, y = mᵀ s;
    with w the decayed state first loses w (eᵀ m), eᵀ m contracting over K (hence all of K here)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_m = state + (i_bh * K + o_k[:, None]) * V + o_v[None, :]
    b_m = tl.load(p_m, mask=m_kv, other=0.0)
    lo = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_G:
        lo += tl.load(g + (i_h if G_STATIC else i_bh)).to(tl.float32)
    if USE_GK:
        lo += tl.load(gk + (i_h if GK_STATIC else i_bh) * K + o_k, mask=m_k, other=0.0).to(tl.float32)[:, None]
    if USE_GV:
        lo += tl.load(gv + (i_h if GV_STATIC else i_bh) * V + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    if A_MODE > 0:
        b_A = tl.load(A + ((i_h if A_MODE == 1 else i_bh) * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
        if USE_DT:
            b_A *= tl.load(dt + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        lo += b_A
    b_e = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_i = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_s = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_m = tl.exp(lo) * b_m
    if USE_W:
        b_w = tl.load(w + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_m -= b_w[:, None] * tl.sum(b_m * b_e[:, None], axis=0)[None, :]
    b_m += b_e[:, None] * b_i[None, :]
    tl.store(p_m, b_m, mask=m_kv)
    tl.store(y + i_bh * V + o_v, tl.sum(b_m * b_s[:, None], axis=0).to(y.dtype.element_ty), mask=m_v)


def eos_step_triton(s, e, i, state, decay: Decay):
    """Like eos_step_torch, but updates `state` (fp32, contiguous) in place and returns it."""
    B, H, K = s.shape
    V = i.shape[-1]
    y = torch.empty(B, H, V, dtype=s.dtype, device=s.device)
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, 4096 // BK))
    step_kernel[(triton.cdiv(V, BV), B * H)](
        s.contiguous(), e.contiguous(), i.contiguous(), state, y,
        *(None if x is None else x.contiguous() for x in (decay.g, decay.gk, decay.gv, decay.dt, decay.A, decay.w)),
        H=H, K=K, V=V, BK=BK, BV=BV, **decay_flags(decay), USE_W=decay.w is not None, num_warps=4,
    )
    return y, state
