"""Chunked PyTorch path for the delta rule: the WY / UT form, differentiated by autograd.

The recurrence (lcsm/kernels/reference.py), with D_t the element-wise decay (none, g or gk):

    m_t = (I - w_t e_tᵀ)(D_t ⊙ m_{t-1}) + e_t i_tᵀ = D_t ⊙ m_{t-1} + e_t i_tᵀ - w_t r_tᵀ,
    r_t = (D_t ⊙ m_{t-1})ᵀ e_t  (the value read at e_t before the write),      y_t = m_tᵀ s_t.

Within a chunk of C tokens with state H at its start and G_t the chunk-local inclusive cumsum of
the log decay (along K, or a scalar), write M^{xy}_{tj} = Σ_k x_tk y_jk exp(G_tk - G_jk) for the
decayed scores. Unrolling r_t over the chunk gives one unit lower-triangular system:

    (I + A) R = (E ⊙ Γ) H + B I,    A = strict_lower(M^{ew}),  B = strict_lower(M^{ee}),  Γ = exp(G)

solved once per chunk (triangular solve, fp32/fp64) as R = W̃ H + U with W̃ = (I + A)⁻¹ (E ⊙ Γ),
U = (I + A)⁻¹ B I. Then across chunks, like the separable forms,

    H_next = exp(G_C) ⊙ H + (E ⊙ Γ_out)ᵀ I - (W ⊙ Γ_out)ᵀ R,     Γ_out = exp(G_C - G)
    Y      = (S ⊙ Γ) H + P I - Q R,    P = lower(M^{se}), Q = lower(M^{sw}) (diagonal included).

With e = β w (DeltaNet) the two writes merge into w (β i - r)ᵀ, fla's "u - w h"; the general
form keeps e and w apart. A decay with beta and w = e (the same tensor: how the model's delta
oscillation calls it) takes that form here too (docs/kernels.md, "fla's form"): A = diag(β) M^{ww},
Ũ = T (β I) - W̃ H, H_next = exp(G_C) ⊙ H + (W ⊙ Γ_out)ᵀ Ũ, Y = (S ⊙ Γ) H + Q Ũ — no B, no P. Numerics: every exponent is <= 0 (pairwise differences masked to -inf
above the diagonal before exp), so strong decays cannot overflow; with ‖w‖·‖e‖ <= 1 the solve is
well conditioned (its inverse stays O(1), see docs/kernels.md). A decay along K materialises
[C, C, K] pairwise decays: that path uses chunks of 16 by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decay import Decay, state_dtype
from .chunked import _chunks, _pairwise


def eos_delta(s, e, i, decay: Decay, h0=None, chunk_size: int = 64):
    """One batch of sequences, a delta-rule decay (w with g and/or gk; beta with w = e takes fla's
    form, beta with another w is folded into e). Returns (y [B,T,H,V] in s.dtype, ht [B,H,K,V]
    fp32/fp64)."""
    if decay.beta is not None and decay.w is not e:
        e, decay = decay.fold_beta(e)
    keyed = decay.beta is not None
    B, T, H, K = s.shape
    V = i.shape[-1]
    dtype = state_dtype(s)
    state = torch.zeros(B, H, K, V, dtype=dtype, device=s.device) if h0 is None else h0.to(dtype)
    if T == 0:
        return s.new_zeros(B, 0, H, V), state
    C = chunk_size
    pad = (-T) % C
    q, k, v, w = (x.to(dtype) for x in (s, e, i, decay.w))
    if keyed:  # β as a [B,T,H,1] column (a static [H] broadcast over tokens)
        beta = decay.beta_per_token(B, T).to(dtype)[..., None]
    if pad:  # zero inputs, removal keys and log gates: the padding's transitions are the identity
        q, k, v, w = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, w))
        beta = F.pad(beta, (0, 0, 0, 0, 0, pad)) if keyed else None
    q, k, v, w = (_chunks(x, C) for x in (q, k, v, w))  # [B,H,NC,C,D]
    beta = _chunks(beta, C) if keyed else None  # [B,H,NC,C,1]
    L = decay.chunk_cumsum(B, T, C, dtype)[0]
    L = None if L is None else _chunks(L, C)  # [B,H,NC,C,K|1]
    lower = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()
    strict = lower.tril(-1)
    pair_k = None if L is None or L.shape[-1] == 1 else _pairwise(L, lower)  # [..., C, C, K]
    pair_s = None if L is None or L.shape[-1] != 1 else _pairwise(L, lower)[..., 0]  # [..., C, C]

    def scores(x, y, mask):
        """M^{xy} masked to `mask` (strict or inclusive lower triangle); with a decay along K, y is
        the column operand already weighted by the pairwise decays, [..., t, j, K]."""
        if pair_k is not None:
            out = torch.einsum("...tk,...tjk->...tj", x, y)  # a batched mat-vec per row t
        else:
            out = x @ y.transpose(-1, -2)
            if pair_s is not None:
                out = out * pair_s
        return out.masked_fill(~mask, 0.0)

    ww = w if pair_k is None else w[..., None, :, :] * pair_k
    gam = None if L is None else torch.exp(L)  # Γ_t
    gam_out = None if L is None else torch.exp(L[..., -1:, :] - L)  # Γ_out
    eye = torch.eye(C, dtype=dtype, device=s.device)
    w_out = w if gam_out is None else w * gam_out
    decay_end = None if L is None else torch.exp(L[..., -1, :])[..., :, None]  # [B,H,NC,K|1,1]
    q_in = q if gam is None else q * gam
    Q = scores(q, ww, lower)
    starts, Rs = [], []
    if keyed:
        # fla's form: one solve for W̃ = T (β w ⊙ Γ) and T (β I); Rs holds the new values Ũ
        A = beta * scores(w, ww, strict)
        w_in = w if gam is None else w * gam
        sol = torch.linalg.solve_triangular(eye + A, torch.cat([beta * w_in, beta * v], dim=-1), upper=False,
                                            unitriangular=True)
        Wt, U = sol[..., :K], sol[..., K:]
        for c in range(q.shape[2]):
            starts.append(state)
            new = U[:, :, c] - Wt[:, :, c] @ state
            Rs.append(new)
            nxt = state if decay_end is None else state * decay_end[:, :, c]
            state = nxt + w_out[:, :, c].transpose(-1, -2) @ new
        Hc, new = torch.stack(starts, dim=2), torch.stack(Rs, dim=2)
        y = q_in @ Hc + Q @ new
    else:
        kk = k if pair_k is None else k[..., None, :, :] * pair_k
        A, Bm = scores(k, ww, strict), scores(k, kk, strict)
        P = scores(q, kk, lower)
        k_in = k if gam is None else k * gam
        # one solve per chunk for both right-hand sides, W̃ = T (E ⊙ Γ) and U = T B I
        sol = torch.linalg.solve_triangular(eye + A, torch.cat([k_in, Bm @ v], dim=-1), upper=False, unitriangular=True)
        Wt, U = sol[..., :K], sol[..., K:]
        k_out = k if gam_out is None else k * gam_out
        write = k_out.transpose(-1, -2) @ v  # [B,H,NC,K,V]: the known writes, independent of the state
        for c in range(q.shape[2]):
            starts.append(state)
            R = Wt[:, :, c] @ state + U[:, :, c]
            Rs.append(R)
            nxt = state if decay_end is None else state * decay_end[:, :, c]
            state = nxt + write[:, :, c] - w_out[:, :, c].transpose(-1, -2) @ R
        Hc, R = torch.stack(starts, dim=2), torch.stack(Rs, dim=2)
        y = q_in @ Hc + P @ v - Q @ R
    y = y.permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, V)[:, :T]
    return y.to(s.dtype), state
