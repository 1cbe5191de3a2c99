"""One token of the recurrence, for decoding: m = o ⊙ m + e iᵀ, y = mᵀ s.

Shapes are those of DESIGN §2 without the time axis: s, e [B,H,K], i [B,H,V], state [B,H,K,V]
(fp32), g [B,H] or [H], gk [B,H,K] or [H,K], gv [B,H,V] or [H,V], dt [B,H,V] with A [H,K,V], or
A alone [H,K,V] or [B,H,K,V].
"""

from __future__ import annotations

import torch


def step_log_decay(B, g=None, gk=None, gv=None, dt=None, A=None):
    """log o for one token, broadcastable to [B,H,K,V], or None for no decay."""
    out = None

    def add(x):
        nonlocal out
        out = x if out is None else out + x

    if g is not None:
        add(g.float()[..., None, None])
    if gk is not None:
        add(gk.float()[..., None])
    if gv is not None:
        add(gv.float()[..., None, :])
    if dt is not None:
        add(dt.float()[..., None, :] * A.float())
    elif A is not None:
        add(A.float())
    return out


def eos_step_torch(s, e, i, state, g=None, gk=None, gv=None, dt=None, A=None):
    """Returns (y [B,H,V] in the dtype of s, new state [B,H,K,V] fp32)."""
    log_o = step_log_decay(s.shape[0], g, gk, gv, dt, A)
    m = state.float() if log_o is None else torch.exp(log_o) * state.float()
    m = m + e.float()[..., :, None] * i.float()[..., None, :]
    y = torch.einsum("bhk,bhkv->bhv", s.float(), m)
    return y.to(s.dtype), m
