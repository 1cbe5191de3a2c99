"""`eos_recurrence` and `eos_step`: the entry points from model code to the recurrence backends."""

from __future__ import annotations

import os

import torch

from .chunked import eos_chunked
from .common import STATIC_DIMS, check_inputs, slice_time
from .reference import eos_reference
from .scan import eos_scan
from .step import eos_step_torch

BACKENDS = ("auto", "triton", "torch", "reference")


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
    h0: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ, y_t = m_tᵀ s_t over [B,T,H,·] tensors.

    Args (canonical tensors, see kernels/common.py): s, e [B,T,H,K]; i [B,T,H,V]; the log decays
    g, gk, gv, dt, A (all <= 0, any combination; none means o = 1); h0 [N,H,K,V];
    cu_seqlens [N+1] for N packed sequences in a batch of one.
    backend: "triton" (chunked kernels for separable decays, scan kernels for dt/A; on the CPU only
    under TRITON_INTERPRET=1), "torch" (chunked for separable decays, sequential for dt/A),
    "reference" (the loop, computed in fp64 and cast back), "auto" (triton on CUDA, else torch).
    chunk_size applies to the torch backend (the Triton kernels use chunks of 64).
    Returns y [B,T,H,V] in the dtype of s, and ht [N,H,K,V] (fp32, fp64 for fp64 inputs) if
    output_final_state else None.
    """
    backend = resolve_backend(backend, s)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"eos_recurrence: chunk_size must be >= 1 (got {chunk_size})")
    shapes = check_inputs(s, e, i, g, gk, gv, dt, A, h0, cu_seqlens)
    gates = {"g": g, "gk": gk, "gv": gv, "dt": dt, "A": A}
    if backend == "triton":
        if chunk_size not in (None, 64):
            raise ValueError(f"eos_recurrence: the triton backend uses chunks of 64 (got chunk_size={chunk_size})")
        from .triton_api import chunk_eos, scan_eos  # imported late: triton is only needed here

        # the kernels' matrix products need one dtype: under autocast a parameter-only stage or a
        # power stays fp32 beside bf16 activations, so promote to the widest of s, e, i
        out_dtype = s.dtype
        common = torch.promote_types(torch.promote_types(s.dtype, e.dtype), i.dtype)
        s, e, i = s.to(common), e.to(common), i.to(common)
        if dt is None and A is None:
            y, ht = chunk_eos(s, e, i, g, gk, gv, h0, output_final_state, cu_seqlens)
        else:
            y, ht = scan_eos(s, e, i, g, gk, gv, dt, A, h0, output_final_state, cu_seqlens)
        return y.to(out_dtype), (ht if output_final_state else None)
    if backend == "reference":
        def run(s, e, i, h0, **gates):
            y, ht = eos_reference(s, e, i, h0=h0, **gates)
            return y.to(s.dtype), ht.to(torch.float32 if s.dtype != torch.float64 else torch.float64)
    elif dt is not None or A is not None:
        def run(s, e, i, h0, **gates):
            return eos_scan(s, e, i, h0=h0, chunk_size=chunk_size or 64, **gates)
    else:
        default = 64 if gk is None and gv is None else 16

        def run(s, e, i, h0, g, gk, gv, dt, A):
            return eos_chunked(s, e, i, g=g, gk=gk, gv=gv, h0=h0, chunk_size=chunk_size or default)

    if cu_seqlens is None:
        y, ht = run(s, e, i, h0, **gates)
        return y, (ht if output_final_state else None)
    # packed sequences: run each one with its own initial state
    ys, hts = [], []
    bounds = cu_seqlens.tolist()
    for n in range(shapes.N):
        a, b = bounds[n], bounds[n + 1]
        part = {name: slice_time(x, a, b, STATIC_DIMS[name]) for name, x in gates.items()}
        y, ht = run(s[:, a:b], e[:, a:b], i[:, a:b], None if h0 is None else h0[n : n + 1], **part)
        ys.append(y)
        hts.append(ht)
    return torch.cat(ys, dim=1), (torch.cat(hts, dim=0) if output_final_state else None)


def eos_step(s, e, i, state, *, g=None, gk=None, gv=None, dt=None, A=None, backend: str = "auto"):
    """One token: state <- o ⊙ state + e iᵀ, y = stateᵀ s. See kernels/step.py for shapes.

    Returns (y [B,H,V], new state [B,H,K,V] fp32). The triton backend updates a contiguous fp32
    `state` in place (and returns it); the others return a new tensor."""
    backend = resolve_backend(backend, s)
    if backend == "triton" and state.dtype == torch.float32 and state.is_contiguous():
        from .triton_step import eos_step_triton

        return eos_step_triton(s, e, i, state, g=g, gk=gk, gv=gv, dt=dt, A=A)
    return eos_step_torch(s, e, i, state, g=g, gk=gk, gv=gv, dt=dt, A=A)
