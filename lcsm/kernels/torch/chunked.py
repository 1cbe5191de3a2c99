"""Chunked PyTorch path for the separable forms (ones, scalar, vector_k, vector_v, outer).

Time is cut into chunks of C tokens. Inside a chunk the output is a masked "attention" with the
pairwise decay exp(L_t - L_s), L the chunk-local cumulative log gate; across chunks a K×V state is
carried. Every exponent used is <= 0: pairwise differences are masked to -inf above the diagonal
before exp, and the state terms only ever decay forward. So strong gates (log o = -5 per step and
below) cannot overflow, at the price of materialising [C, C, K] (and [C, C, V]) decays, which is
fine for the CPU-sized models this path serves. Differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decay import Decay, state_dtype


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B,T,H,D] (T a multiple of C) -> [B,H,NC,C,D]."""
    B, T, H, D = x.shape
    return x.reshape(B, T // C, C, H, D).permute(0, 3, 1, 2, 4)


def _pairwise(L: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_s) for s <= t, else 0: [..., C, D] -> [..., C, C, D]."""
    diff = L[..., :, None, :] - L[..., None, :, :]
    return torch.exp(torch.where(mask[..., None], diff, float("-inf")))


def eos_chunked(s, e, i, decay: Decay, h0=None, chunk_size: int = 32):
    """One batch of sequences, a separable decay. Returns (y [B,T,H,V] in s.dtype, ht [B,H,K,V] fp32/fp64)."""
    B, T, H, K = s.shape
    V = i.shape[-1]
    dtype = state_dtype(s)
    if T == 0:
        state = torch.zeros(B, H, K, V, dtype=dtype, device=s.device) if h0 is None else h0.to(dtype)
        return s.new_zeros(B, 0, H, V), state
    C = chunk_size
    pad = (-T) % C
    q, k, v = (x.to(dtype) for x in (s, e, i))
    if pad:  # zero inputs (and zero log gates, in chunk_cumsum) leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    q, k, v = _chunks(q, C), _chunks(k, C), _chunks(v, C)
    Lk, Lv = (None if L is None else _chunks(L, C) for L in decay.chunk_cumsum(B, T, C, dtype))
    mask = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()

    # intra-chunk: attn[t, s] = sum_k q_tk k_sk exp(Lk_t - Lk_s)_k, masked to s <= t
    if Lk is None:
        attn = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
    elif Lk.shape[-1] == 1:
        attn = (q @ k.transpose(-1, -2)) * _pairwise(Lk, mask)[..., 0]
    else:
        attn = torch.einsum("...tk,...sk,...tsk->...ts", q, k, _pairwise(Lk, mask))
    if Lv is None:
        y = attn @ v
    else:
        y = torch.einsum("...ts,...sv,...tsv->...tv", attn, v, _pairwise(Lv, mask))

    # inter-chunk: carry the state, each chunk adds its decayed contribution
    q_in = q if Lk is None else q * torch.exp(Lk)
    k_out = k if Lk is None else k * torch.exp(Lk[..., -1:, :] - Lk)
    v_out = v if Lv is None else v * torch.exp(Lv[..., -1:, :] - Lv)
    update = k_out.transpose(-1, -2) @ v_out  # [B,H,NC,K,V]
    decay_k = None if Lk is None else torch.exp(Lk[..., -1, :])[..., :, None]  # [B,H,NC,K|1,1]
    decay_v = None if Lv is None else torch.exp(Lv[..., -1, :])[..., None, :]
    state = torch.zeros(B, H, K, V, dtype=dtype, device=s.device) if h0 is None else h0.to(dtype)
    starts = []
    for c in range(q.shape[2]):
        starts.append(state)
        if decay_k is not None:
            state = state * decay_k[:, :, c]
        if decay_v is not None:
            state = state * decay_v[:, :, c]
        state = state + update[:, :, c]
    y_inter = q_in @ torch.stack(starts, dim=2)
    if Lv is not None:
        y_inter = y_inter * torch.exp(Lv)
    y = (y + y_inter).permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, V)[:, :T]
    return y.to(s.dtype), state
