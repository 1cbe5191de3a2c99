"""One token of the recurrence, for decoding: m = o ⊙ m + e iᵀ, y = mᵀ s; with a removal key w
(the delta rule) m = (I - w eᵀ)(o ⊙ m) + e iᵀ.

Shapes are those of the canonical tensors without the time axis: s, e [B,H,K], i [B,H,V], state
[B,H,K,V] (fp32) and a one-token Decay (lcsm/kernels/decay.py).
"""

from __future__ import annotations

import torch

from ..decay import Decay


def eos_step_torch(s, e, i, state, decay: Decay):
    """Returns (y [B,H,V] in the dtype of s, new state [B,H,K,V] fp32)."""
    m = decay.transition(state.float(), None, e)
    m = m + e.float()[..., :, None] * i.float()[..., None, :]
    y = torch.einsum("bhk,bhkv->bhv", s.float(), m)
    return y.to(s.dtype), m
