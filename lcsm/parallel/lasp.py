"""LASP-2 for the EOS recurrence and LASP-2H for softmax attention.

LASP-2 (separable and full decays). Rank r holds tokens [r·C, (r+1)·C) and runs the recurrence
m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ on its slice from m = 0, giving outputs y_t⁰ and final state M_r.
Its total log decay is λ_r = Σ_{t in slice} log o_t (per K, per V or K×V). The true state entering
rank r is the decayed prefix

    P_r = Σ_{j<r} exp(λ_{j+1} + ... + λ_{r-1}) ⊙ M_j,

and, because the recurrence is linear in m, the true outputs are
    y_t = y_t⁰ + (exp(Λ_t) ⊙ P_r)ᵀ s_t,   Λ_t = Σ_{τ = slice start .. t} log o_τ.

One all-gather of (M_r, λ_r) per layer, of size B·H·K·V (+ B·H·(K+V)), independent of T. The
all-gather is differentiable (its backward is a reduce-scatter), so autograd gives the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcsm import kernels
from lcsm.kernels.decay import Decay

from .context import SequenceParallel, all_gather


def lasp2(y: torch.Tensor, ht: torch.Tensor, s: torch.Tensor, decay: Decay, ctx: SequenceParallel) -> torch.Tensor:
    """Add the earlier ranks' contribution to this rank's outputs.

    y [B,T,H,V] (from zero state), ht [B,H,K,V] fp32 (this slice's final state), s [B,T,H,K],
    decay: the slice's Decay (as given to the recurrence). Returns y [B,T,H,V] in y's dtype.
    """
    B, T, H, K = s.shape
    V = y.shape[-1]
    f = ht.dtype
    cum = decay.cumsum(B, T, f)  # Λ_t: the inclusive cumulative log decay of this slice
    total = decay.total(B, T, (H, K, V), f, y.device)  # λ_r, one [B,H,K,V] tensor
    # one all-gather: every rank's final state and total decay
    gathered = all_gather(torch.stack([ht.to(f), total]), ctx)  # [R,2,B,H,K,V]
    states, totals = gathered[:, 0], gathered[:, 1]
    r = ctx.rank
    if r == 0:
        # no prefix; the zero term keeps the all-gather in the graph so that every rank joins its backward
        return y + (states.sum() * 0.0).to(y.dtype)
    # P_r = Σ_{j<r} exp(Σ_{l=j+1}^{r-1} λ_l) ⊙ M_j
    prefix = torch.zeros_like(ht, dtype=f)
    for j in range(r):
        decay_j = totals[j + 1 : r].sum(0) if j + 1 < r else None
        prefix = prefix + (states[j] if decay_j is None else torch.exp(decay_j) * states[j])

    # y_t += Σ_k s_t[k] exp(Λ_t[k,v]) P[k,v]
    q = s.to(f)
    along_k, along_v, full = cum.along_k(B, T, f), cum.along_v(B, T, f), cum.full(B, T, f)
    if along_k is not None:
        q = q * torch.exp(along_k)
    if full is not None:
        extra = torch.einsum("bthk,bthkv,bhkv->bthv", q, torch.exp(full), prefix)
    else:
        extra = torch.einsum("bthk,bhkv->bthv", q, prefix)
    if along_v is not None:
        extra = extra * torch.exp(along_v)
    return y + extra.to(y.dtype)


def lasp2_delta(s: torch.Tensor, e: torch.Tensor, i: torch.Tensor, decay: Decay, ctx: SequenceParallel,
                backend: str = "auto") -> torch.Tensor:
    """LASP-2 for a decay with a delta-rule transition: rank r's slice is the affine map
    m ↦ P_r m + S_r (P_r [B,H,K,K] the product of its transitions (I − w eᵀ)D in time order, S_r its
    final state from m = 0). One all-gather of (P_r, S_r) — size independent of T — gives every rank
    its exact entering state M_r = P_{r-1} M_{r-1} + S_{r-1} (M_0 = 0), from which it runs its slice.

    s, e [B,T,H,K], i [B,T,H,V]; returns y [B,T,H,V]. Differentiable: the all-gather's backward is a
    reduce-scatter and the slice's recurrence takes M_r as h0."""
    B, T, H, K = s.shape
    V = i.shape[-1]
    _, S = kernels.recurrence(s, e, i, decay, output_final_state=True, backend=backend)
    P = kernels.delta_transition(e, decay, backend=backend)  # [B,H,K,K]: m_end = P m_start + S
    f = S.dtype
    # one all-gather of both, packed along the last axis: [R, B, H, K, K + V]
    gathered = all_gather(torch.cat([P.to(f), S], dim=-1), ctx)
    Ps, Ss = gathered[..., :K], gathered[..., K:]
    state = torch.zeros(B, H, K, V, dtype=f, device=s.device) + 0.0 * gathered.sum()  # every rank joins the backward
    for j in range(ctx.rank):
        state = Ps[j] @ state + Ss[j]
    y, _ = kernels.recurrence(s, e, i, decay, h0=state, backend=backend)
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SequenceParallel) -> torch.Tensor:
    """LASP-2H: causal softmax attention of this slice's queries over all earlier keys.

    q, k, v [B,H,T,D] (SDPA layout), already position-encoded with global positions. K and V are
    all-gathered along the sequence; query t (global offset + t) sees keys 0..offset + t.
    Returns [B,H,T,D].
    """
    T = q.shape[2]
    kv = all_gather(torch.stack([k, v]), ctx)  # [R,2,B,H,T,D]
    kv = kv[: ctx.rank + 1]  # later ranks' keys are masked anyway
    keys = kv[:, 0].permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B,H,(r+1)T,D]
    values = kv[:, 1].permute(1, 2, 0, 3, 4).flatten(2, 3)
    qpos = ctx.offset + torch.arange(T, device=q.device)
    kpos = torch.arange(keys.shape[2], device=q.device)
    mask = kpos[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
