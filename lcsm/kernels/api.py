"""`eos_recurrence` and `eos_step`: the entry points from model code to the recurrence backends."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch

from .decay import Decay
from .reference import eos_reference
from .torch.chunked import eos_chunked
from .torch.delta import eos_delta
from .torch.scan import eos_scan
from .torch.step import eos_step_torch

BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class Shapes:
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # number of sequences (B, or len(cu_seqlens) - 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> triton on CUDA, torch elsewhere; 'triton' on a CPU tensor needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"eos_recurrence: backend '{backend}' is not known; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError(
            "eos_recurrence: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before lcsm is "
            "imported (the Triton interpreter: slow, for tests); use backend='torch' on the CPU"
        )
    return backend


def check_inputs(s, e, i, decay: Decay, h0, cu_seqlens) -> Shapes:
    """Validate canonical shapes; raise ValueError naming the argument and what is allowed."""
    for name, t in (("s", s), ("e", e), ("i", i)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"eos_recurrence: '{name}' must be a 4-d tensor [B,T,H,D]")
    B, T, H, K = s.shape
    V = i.shape[-1]
    if e.shape != s.shape:
        raise ValueError(f"eos_recurrence: 'e' has shape {tuple(e.shape)}; expected the shape of s, {tuple(s.shape)}")
    if i.shape[:3] != s.shape[:3]:
        raise ValueError(f"eos_recurrence: 'i' has shape {tuple(i.shape)}; expected [B,T,H,V] = [{B},{T},{H},V]")
    decay.check(B, T, H, K, V)
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
        raise ValueError(f"eos_recurrence: 'h0' has shape {tuple(h0.shape)}; expected [N,H,K,V] = {[N, H, K, V]}")
    return Shapes(B, T, H, K, V, N)


def eos_recurrence(
    s: torch.Tensor,
    e: torch.Tensor,
    i: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    dt: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ, y_t = m_tᵀ s_t over [B,T,H,·] tensors; with a removal
    key w (the delta rule) m_t = (I - w_t e_tᵀ)(o_t ⊙ m_{t-1}) + e_t i_tᵀ.

    Args (canonical tensors, see lcsm/kernels/decay.py): s, e [B,T,H,K]; i [B,T,H,V]; the log
    decays g, gk, gv, dt, A (all <= 0, any combination; none means o = 1; -inf is a hard reset);
    w [B,T,H,K] the removal key of the delta rule (with g and/or gk only); beta [B,T,H] or [H]
    (with w) the write strength: the recurrence with e replaced by beta ⊙ e (DeltaNet's
    eos_recurrence(q, k, v, w=k, beta=β); with w the same tensor as e the Triton kernels take
    fla's form and never form beta ⊙ e); h0 [N,H,K,V];
    cu_seqlens [N+1] for N packed sequences in a batch of one.
    backend: "triton" (chunked kernels for separable decays and the delta rule, scan kernels for
    dt/A; on the CPU only under TRITON_INTERPRET=1), "torch" (chunked for separable decays and the
    delta rule, sequential for dt/A), "reference" (the loop, computed in fp64 and cast back),
    "auto" (triton on CUDA, else torch). chunk_size applies to the torch backend (the Triton
    kernels use chunks of 64).
    Returns y [B,T,H,V] in the dtype of s, and ht [N,H,K,V] (fp32, fp64 for fp64 inputs) if
    output_final_state else None.
    """
    decay = Decay.of(g=g, gk=gk, gv=gv, dt=dt, A=A, w=w, beta=beta)
    return recurrence(s, e, i, decay, h0=h0, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      chunk_size=chunk_size, backend=backend)


def recurrence(s, e, i, decay: Decay, *, h0=None, output_final_state=False, cu_seqlens=None, chunk_size=None,
               backend="auto"):
    """eos_recurrence with the decay already gathered into a Decay (what model code calls)."""
    backend = resolve_backend(backend, s)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"eos_recurrence: chunk_size must be >= 1 (got {chunk_size})")
    shapes = check_inputs(s, e, i, decay, h0, cu_seqlens)
    # beta with w = e is fla's form, which the Triton kernels (delta_autograd.py) and the torch
    # path (torch/delta.py) take as such; elsewhere it is the same recurrence with the write key
    # beta ⊙ e formed here
    same_key = decay.beta is not None and decay.w is e
    if not (backend in ("triton", "torch") and same_key):
        e, decay = decay.fold_beta(e)
    if backend == "triton":
        if chunk_size not in (None, 64):
            raise ValueError(f"eos_recurrence: the triton backend uses chunks of 64 (got chunk_size={chunk_size})")
        from .triton.autograd import chunk_eos, scan_eos  # imported late: triton is only needed here
        from .triton.delta_autograd import delta_eos

        # the kernels' matrix products need one dtype: under autocast a parameter-only stage or a
        # power stays fp32 beside bf16 activations, so promote to the widest of s, e, i (and w)
        out_dtype = s.dtype
        common = torch.promote_types(torch.promote_types(s.dtype, e.dtype), i.dtype)
        if decay.delta:
            common = torch.promote_types(common, decay.w.dtype)
        s, e, i = s.to(common), e.to(common), i.to(common)
        if decay.delta:
            decay = replace(decay, w=e if same_key else decay.w.to(common))
        if torch.compiler.is_compiling():  # one opaque op for the compiler (lcsm/kernels/ops.py)
            y, ht = _compiled_triton(s, e, i, decay, h0, output_final_state, cu_seqlens, same_key)
        else:
            run = delta_eos if decay.delta else chunk_eos if decay.separable else scan_eos
            y, ht = run(s, e, i, decay, h0, output_final_state, cu_seqlens)
        return y.to(out_dtype), (ht if output_final_state else None)
    if backend == "reference":
        def run(s, e, i, h0, decay):
            y, ht = eos_reference(s, e, i, h0=h0, **decay.tensors())
            return y.to(s.dtype), ht.to(torch.float32 if s.dtype != torch.float64 else torch.float64)
    elif decay.delta:
        default = 16 if decay.gk is not None else 64  # a decay along K materialises [C, C, K]

        def run(s, e, i, h0, decay):
            return eos_delta(s, e, i, decay, h0=h0, chunk_size=chunk_size or default)
    elif not decay.separable:
        def run(s, e, i, h0, decay):
            return eos_scan(s, e, i, decay, h0=h0, chunk_size=chunk_size or 64)
    else:
        default = 64 if decay.gk is None and decay.gv is None else 16

        def run(s, e, i, h0, decay):
            return eos_chunked(s, e, i, decay, h0=h0, chunk_size=chunk_size or default)

    if cu_seqlens is None:
        y, ht = run(s, e, i, h0, decay)
        return y, (ht if output_final_state else None)
    # packed sequences: run each one with its own initial state
    ys, hts = [], []
    bounds = cu_seqlens.tolist()
    for n in range(shapes.N):
        a, b = bounds[n], bounds[n + 1]
        e_n, decay_n = e[:, a:b], decay.slice(a, b)
        if decay.beta is not None:  # fla's form (same_key, kept for the torch path): w is e, sliced alike
            decay_n = replace(decay_n, w=e_n)
        y, ht = run(s[:, a:b], e_n, i[:, a:b], None if h0 is None else h0[n : n + 1], decay_n)
        ys.append(y)
        hts.append(ht)
    return torch.cat(ys, dim=1), (torch.cat(hts, dim=0) if output_final_state else None)


def _compiled_triton(s, e, i, decay: Decay, h0, output_final_state: bool, cu_seqlens, same_key: bool = False):
    """The Triton backend through the custom ops of lcsm/kernels/ops.py (under torch.compile);
    same_key: the decay's beta with w = e (fla's form)."""
    from . import ops

    s, e, i = s.contiguous(), e.contiguous(), i.contiguous()
    if decay.delta and same_key:
        beta = decay.beta_per_token(*e.shape[:2])
        y, ht = ops.delta(s, e, i, None, decay.g, decay.gk, h0, cu_seqlens, output_final_state, beta=beta)
    elif decay.delta:
        y, ht = ops.delta(s, e, i, decay.w, decay.g, decay.gk, h0, cu_seqlens, output_final_state)
    elif decay.separable:
        d = decay.fold_scalar()
        y, ht, *_ = ops.chunk_fwd(s, e, i, d.g, d.gk, d.gv, h0, cu_seqlens, output_final_state)
    else:
        y, ht, _ = ops.scan_fwd(s, e, i, decay.g, decay.gk, decay.gv, decay.dt, decay.A, h0, cu_seqlens, output_final_state)
    return y, ht


def eos_step(s, e, i, state, *, g=None, gk=None, gv=None, dt=None, A=None, w=None, beta=None, backend: str = "auto"):
    """One token: state <- o ⊙ state + e iᵀ (with a removal key w: state <- (I - w eᵀ)(o ⊙ state)
    + e iᵀ), y = stateᵀ s. Shapes: s, e, w [B,H,K], i [B,H,V], state [B,H,K,V] fp32, and the
    decays of one token (lcsm/kernels/decay.py, `step`; beta [B,H] or [H] scales e, as in
    eos_recurrence).

    Returns (y [B,H,V], new state [B,H,K,V] fp32). The triton backend updates a contiguous fp32
    `state` in place (and returns it); the others return a new tensor."""
    return step(s, e, i, state, Decay.of(g=g, gk=gk, gv=gv, dt=dt, A=A, w=w, beta=beta, step=True), backend=backend)


def step(s, e, i, state, decay: Decay, backend: str = "auto"):
    """eos_step with a one-token Decay (what model code calls)."""
    backend = resolve_backend(backend, s)
    decay.check_delta()
    e, decay = decay.fold_beta(e)
    if backend == "triton" and torch.compiler.is_compiling():
        from . import ops

        return ops.step(s, e, i, state, decay.g, decay.gk, decay.gv, decay.dt, decay.A, decay.w)
    if backend == "triton" and state.dtype == torch.float32 and state.is_contiguous():
        from .triton.step import eos_step_triton

        return eos_step_triton(s, e, i, state, decay)
    return eos_step_torch(s, e, i, state, decay)


def delta_transition(e: torch.Tensor, decay: Decay, *, cu_seqlens: torch.Tensor | None = None,
                     chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """The product of a slice's K×K transitions, for LASP-2 with the delta rule.

    e [B,T,H,K] the expand and `decay` the slice's Decay with its removal key w (and g and/or gk).
    Returns P [N,H,K,K] (fp32; fp64 for fp64 inputs; N = B, or the number of packed sequences):

        P = O_T ⋯ O_2 O_1,    O_t = (I - w_t e_tᵀ) D_t    (the latest token leftmost)

    acting on the K axis of a state m [K,V] from the left: a slice that starts from m_start ends at

        m_end = P @ m_start + S,    S its final state from a zero initial state,

    and its outputs are y_t = y⁰_t + (P_{≤t} m_start)ᵀ s_t, which is the recurrence run with i = 0
    and h0 = m_start. P is the final state of the same recurrence with i = 0 and h0 = I (V = K), so
    it is computed chunk-wise by the chosen backend and differentiable in e, w and the gates."""
    if not decay.delta:
        raise ValueError("delta_transition: the decay has no removal key 'w' (for a separable decay, Decay.total is the slice's map)")
    B, T, H, K = e.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
    eye = torch.eye(K, dtype=dtype, device=e.device).expand(N, H, K, K).contiguous()
    zeros = torch.zeros(B, T, H, K, dtype=e.dtype, device=e.device)
    _, P = recurrence(zeros, e, zeros, decay, h0=eye, output_final_state=True, cu_seqlens=cu_seqlens,
                      chunk_size=chunk_size, backend=backend)
    return P


@contextlib.contextmanager
def state_segments(setting: str | int | None):
    """LCSM_STATE_SEGMENTS ("off", "auto" or S chunks per segment, docs/kernels.md) for the Triton
    calls inside, then back to what it was; None leaves it as the environment set it. For A/B
    runs in one process (`lcsm bench train --variants segments`)."""
    if setting is None:
        yield
        return
    from .triton import autograd, segments  # imported late: triton is only needed here

    before = autograd.STATE_SEGMENTS
    autograd.STATE_SEGMENTS = segments.parse_setting(str(setting))
    try:
        yield
    finally:
        autograd.STATE_SEGMENTS = before
