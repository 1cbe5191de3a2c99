"""Argument checks and small helpers shared by every backend of the EOS recurrence.

Canonical tensors (DESIGN §2), layout [B, T, H, D]:
    s, e  [B,T,H,K]    shrink (query) and expand (key)
    i     [B,T,H,V]    input (value)
    g     [B,T,H] | [H]                log of a scalar decay per head, <= 0
    gk    [B,T,H,K] | [H,K]            log decay along K
    gv    [B,T,H,V] | [H,V]            log decay along V
    dt, A [B,T,H,V], [H,K,V]           log decay dt ⊗ A (selective SSM)
    A     [H,K,V] | [B,T,H,K,V]        with dt absent: the full log decay itself
    h0    [N,H,K,V]                    initial state (N = B, or number of sequences with cu_seqlens)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shapes:
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # number of sequences (B, or len(cu_seqlens) - 1)


def _fail(name: str, t: torch.Tensor, expected: str) -> None:
    raise ValueError(f"eos_recurrence: '{name}' has shape {tuple(t.shape)}; expected {expected}")


def check_inputs(s, e, i, g, gk, gv, dt, A, h0, cu_seqlens) -> Shapes:
    """Validate canonical shapes; raise ValueError naming the argument and what is allowed."""
    for name, t in (("s", s), ("e", e), ("i", i)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"eos_recurrence: '{name}' must be a 4-d tensor [B,T,H,D]")
    B, T, H, K = s.shape
    V = i.shape[-1]
    if e.shape != s.shape:
        _fail("e", e, f"the shape of s, {tuple(s.shape)}")
    if i.shape[:3] != s.shape[:3]:
        _fail("i", i, f"[B,T,H,V] = [{B},{T},{H},V]")
    per_token = {"g": (B, T, H), "gk": (B, T, H, K), "gv": (B, T, H, V)}
    static = {"g": (H,), "gk": (H, K), "gv": (H, V)}
    for name, t in (("g", g), ("gk", gk), ("gv", gv)):
        if t is not None and tuple(t.shape) not in (per_token[name], static[name]):
            _fail(name, t, f"{list(per_token[name])} per token or {list(static[name])} static")
    if dt is not None:
        if tuple(dt.shape) != (B, T, H, V):
            _fail("dt", dt, f"[B,T,H,V] = {[B, T, H, V]}")
        if A is None or tuple(A.shape) != (H, K, V):
            raise ValueError(f"eos_recurrence: 'dt' needs 'A' of shape [H,K,V] = {[H, K, V]}")
    elif A is not None and tuple(A.shape) not in ((H, K, V), (B, T, H, K, V)):
        _fail("A", A, f"[H,K,V] = {[H, K, V]} static or [B,T,H,K,V] per token")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"eos_recurrence: with cu_seqlens the batch must be 1 (packed sequences); got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"eos_recurrence: 'cu_seqlens' must be 1-d, start at 0 and end at T = {T}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("eos_recurrence: 'cu_seqlens' must be non-decreasing")
        N = cu_seqlens.numel() - 1
    if h0 is not None and tuple(h0.shape) != (N, H, K, V):
        _fail("h0", h0, f"[N,H,K,V] = {[N, H, K, V]}")
    return Shapes(B, T, H, K, V, N)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for half types; fp64 stays fp64 (the reference and the tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_token(x: torch.Tensor | None, B: int, T: int, static_dims: int) -> torch.Tensor | None:
    """Broadcast a static gate ([H], [H,K], ...) to per-token shape [B,T,...]."""
    if x is None or x.dim() > static_dims:
        return x
    return x.expand(B, T, *x.shape)


def step_log_decay(t: int, g, gk, gv, dt, A, dtype) -> torch.Tensor | float:
    """log o_t broadcastable to [B,H,K,V]: the sum of whatever decays are given."""
    out: torch.Tensor | float = 0.0
    if g is not None:
        out = out + (g if g.dim() == 1 else g[:, t])[..., :, None, None].to(dtype)
    if gk is not None:
        out = out + (gk if gk.dim() == 2 else gk[:, t])[..., :, :, None].to(dtype)
    if gv is not None:
        out = out + (gv if gv.dim() == 2 else gv[:, t])[..., :, None, :].to(dtype)
    if dt is not None:
        out = out + dt[:, t, :, None, :].to(dtype) * A.to(dtype)
    elif A is not None:
        out = out + (A if A.dim() == 3 else A[:, t]).to(dtype)
    return out


def slice_time(x, start: int, end: int, static_dims: int):
    """x[:, start:end] for per-token tensors; static ones pass through."""
    if x is None or x.dim() <= static_dims:
        return x
    return x[:, start:end]


STATIC_DIMS = {"g": 1, "gk": 2, "gv": 2, "dt": 0, "A": 3}
