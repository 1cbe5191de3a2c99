"""Sequential PyTorch path for any decay, `full` included (dt ⊗ A, or a full log tensor A).

A loop over tokens with the K×V state; the loop is cut into chunks and each chunk is recomputed
in the backward (activation checkpointing), so training memory holds one state per chunk rather
than one per token.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..decay import NAMES, Decay, state_dtype


def _scan_chunk(state, s, e, i, *gates):
    dtype = state.dtype
    decay = Decay(*gates)
    ys = []
    for t in range(s.shape[1]):
        log_o = decay.log_step(t, dtype)
        if log_o is not None:
            state = torch.exp(log_o) * state
        state = state + e[:, t, :, :, None].to(dtype) * i[:, t, :, None, :].to(dtype)
        ys.append(torch.einsum("bhk,bhkv->bhv", s[:, t].to(dtype), state))
    return torch.stack(ys, dim=1), state


def eos_scan(s, e, i, decay: Decay, h0=None, chunk_size: int = 64):
    """One batch of sequences. Returns (y [B,T,H,V] in s.dtype, ht [B,H,K,V] fp32/fp64)."""
    B, T, H, K = s.shape
    V = i.shape[-1]
    dtype = state_dtype(s)
    state = torch.zeros(B, H, K, V, dtype=dtype, device=s.device) if h0 is None else h0.to(dtype)
    ys = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        part = decay.slice(start, end)
        args = [x[:, start:end] for x in (s, e, i)] + [getattr(part, n) for n in NAMES]
        if torch.is_grad_enabled():
            y, state = checkpoint(_scan_chunk, state, *args, use_reentrant=False)
        else:
            y, state = _scan_chunk(state, *args)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else i.new_zeros(B, 0, H, V)
    return y.to(s.dtype), state
