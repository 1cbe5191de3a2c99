"""The EOS recurrence as a plain loop over time: the oracle of every test.

    m_t = exp(log o_t) ⊙ m_{t-1} + e_t i_tᵀ        m_0 = h0 (or 0)
    y_t = m_tᵀ s_t

with log o_t the sum of whichever decays are given (see lcsm/kernels/decay.py). With a removal
key w (the delta rule) the transition is K×K, applied from the left:

    m_t = (I - w_t e_tᵀ)(exp(log o_t) ⊙ m_{t-1}) + e_t i_tᵀ

(DeltaNet: w = k̂, e = β k̂, i = v gives m - β k̂ (k̂ᵀ m) + β k̂ vᵀ). Slow and obvious on purpose;
computes in fp64 unless told otherwise and is differentiable through autograd. A log decay of
-inf is exact here: o = 0.
"""

from __future__ import annotations

import torch

from .decay import Decay


def eos_reference(s, e, i, g=None, gk=None, gv=None, dt=None, A=None, w=None, beta=None, h0=None, dtype=torch.float64):
    """One batch of sequences (no cu_seqlens). Returns (y [B,T,H,V], ht [B,H,K,V]) in `dtype`."""
    e, decay = Decay.of(g=g, gk=gk, gv=gv, dt=dt, A=A, w=w, beta=beta).fold_beta(e)
    B, T, H, K = s.shape
    V = i.shape[-1]
    s, e, i = s.to(dtype), e.to(dtype), i.to(dtype)
    m = torch.zeros(B, H, K, V, dtype=dtype, device=s.device) if h0 is None else h0.to(dtype)
    ys = []
    for t in range(T):
        m = decay.transition(m, t, e[:, t])  # (I - w eᵀ)(o ⊙ m); o ⊙ m without w
        m = m + e[:, t, :, :, None] * i[:, t, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", s[:, t], m))
    y = torch.stack(ys, dim=1) if ys else i.new_zeros(B, 0, H, V)
    return y, m
