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

from .context import SequenceParallel, all_gather


def _cum(log_o: torch.Tensor | None, B: int, T: int, static_dims: int):
    """Inclusive cumulative log decay along T, and the slice total.

    log_o is per token [B,T,*dims] or static [*dims] (the same every token)."""
    if log_o is None:
        return None, None
    if log_o.dim() == static_dims:
        steps = torch.arange(1, T + 1, device=log_o.device, dtype=log_o.dtype).view(T, *[1] * static_dims)
        cum = (steps * log_o).expand(B, T, *log_o.shape)
    else:
        cum = torch.cumsum(log_o, dim=1)
    return cum, cum[:, -1]


def lasp2(y: torch.Tensor, ht: torch.Tensor, s: torch.Tensor, gates: dict, ctx: SequenceParallel) -> torch.Tensor:
    """Add the earlier ranks' contribution to this rank's outputs.

    y [B,T,H,V] (from zero state), ht [B,H,K,V] fp32 (this slice's final state), s [B,T,H,K],
    gates: the log decays given to the recurrence (g [B,T,H]|[H], gk [B,T,H,K]|[H,K],
    gv [B,T,H,V]|[H,V], dt [B,T,H,V] with A [H,K,V], or A [B,T,H,K,V]|[H,K,V]).
    Returns y [B,T,H,V] in y's dtype.
    """
    B, T, H, K = s.shape
    V = y.shape[-1]
    f = ht.dtype
    g, gk, gv, dt, A = (gates.get(k) for k in ("g", "gk", "gv", "dt", "A"))
    cg, tg = _cum(None if g is None else g.to(f), B, T, 1)
    ck, tk = _cum(None if gk is None else gk.to(f), B, T, 2)
    cv, tv = _cum(None if gv is None else gv.to(f), B, T, 2)
    cf = tf = None
    if dt is not None:  # log o_t = dt_t[v] · A[k,v]: Λ_t = (Σ dt)[v] · A[k,v]
        cdt = torch.cumsum(dt.to(f), dim=1)
        cf = cdt[:, :, :, None, :] * A.to(f)
        tf = cf[:, -1]
    elif A is not None:
        cf, tf = _cum(A.to(f), B, T, 3)

    # the slice's total log decay as one [B,H,K,V] tensor (broadcast parts summed)
    total = torch.zeros(B, H, K, V, dtype=f, device=y.device)
    if tg is not None:
        total = total + tg[:, :, None, None]
    if tk is not None:
        total = total + tk[..., None]
    if tv is not None:
        total = total + tv[:, :, None, :]
    if tf is not None:
        total = total + tf
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
        decay = totals[j + 1 : r].sum(0) if j + 1 < r else None
        prefix = prefix + (states[j] if decay is None else torch.exp(decay) * states[j])

    # y_t += Σ_k s_t[k] exp(Λ_t[k,v]) P[k,v]
    q = s.to(f)
    if cg is not None:
        q = q * torch.exp(cg)[..., None]
    if ck is not None:
        q = q * torch.exp(ck)
    if cf is not None:
        extra = torch.einsum("bthk,bthkv,bhkv->bthv", q, torch.exp(cf), prefix)
    else:
        extra = torch.einsum("bthk,bhkv->bthv", q, prefix)
    if cv is not None:
        extra = extra * torch.exp(cv)
    return y + extra.to(y.dtype)


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
