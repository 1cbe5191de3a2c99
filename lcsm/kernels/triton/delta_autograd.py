"""Host side of the delta-rule Triton kernels (delta.py): buffers, grids, and the autograd Function.

Shares the separable forms' bookkeeping (autograd.py): Layout (chunk coordinates, varlen),
Gates (chunk cumsum of the log decays, static gates), chunk_scores (the decayed score matrices)
and gate_grad (the gate gradient assembled within each chunk). The forward keeps only T = (I + A)⁻¹
(in the inputs' dtype, or fp32: solve_config) for the backward, which recomputes W̃, U, the chunk
states and R. With beta (w the key k itself, as the model's delta oscillation calls it) both passes
take fla's form (delta_forward, keyed_backward).
"""

from __future__ import annotations

import os

import torch
import triton

from ..decay import Decay
from . import delta as td
from .autograd import Gates, Layout, chunk_scores, gate_grad, gate_grad_parts, state_buffer_dtype

BT, BC = 64, 16  # the chunk (the solve is written for 64 = four 16-row blocks) and its sub-chunks
T_DTYPES = ("fp32", "input")
SOLVE_PRECISIONS = ("ieee", "tf32x3", "tf32")


def solve_config(k: torch.Tensor) -> tuple[torch.dtype, str]:
    """(the dtype of T = (I + A)⁻¹, the precision of the solve's 16×16 block products).

    LCSM_DELTA_T: "input" (default: k's dtype, as fla-core keeps it; half the traffic of T and the
    W̃U products in bf16) or "fp32"; LCSM_DELTA_SOLVE: "tf32x3" (default: three tf32 tensor-core
    products, close to fp32), "ieee" (fp32 on the FMA units) or "tf32". Read on every call, so that
    scripts/delta_solve_ab.py can set them side by side in one process; docs/benchmarks.md has what
    each costs and what it does to the bf16 error."""
    t, prec = os.environ.get("LCSM_DELTA_T", "input"), os.environ.get("LCSM_DELTA_SOLVE", "tf32x3")
    if t not in T_DTYPES:
        raise ValueError(f"LCSM_DELTA_T={t!r}: allowed are {', '.join(T_DTYPES)}")
    if prec not in SOLVE_PRECISIONS:
        raise ValueError(f"LCSM_DELTA_SOLVE={prec!r}: allowed are {', '.join(SOLVE_PRECISIONS)}")
    return (torch.float32 if t == "fp32" or not k.dtype.is_floating_point else k.dtype), prec


def _scores(a, b, gates: Gates, lay: Layout) -> torch.Tensor:
    """M^{ab}[t, j] = Σ_k a_tk b_jk exp(G_tk - G_jk) for j <= t, [B,T,H,BT] fp32."""
    if gates.use["gk"]:
        return chunk_scores(a, b, gates.cum["gk"], gates.stat["gk"], None, None, lay)
    return chunk_scores(a, b, None, None, gates.cum["g"], gates.stat["g"], lay)


def _kw(gates: Gates) -> dict:
    return dict(USE_G=gates.use["g"], G_STATIC=gates.static["g"], USE_GK=gates.use["gk"], GK_STATIC=gates.static["gk"])


def _full_k(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def solve(A: torch.Tensor, lay: Layout, config: tuple[torch.dtype, str], beta=None) -> torch.Tensor:
    """T = (I + strict_lower(A))⁻¹ per chunk, [B,T,H,BT] (dtype: solve_config); with beta
    [B,T,H], of diag(β) A."""
    B, T, H = A.shape[:3]
    dtype, prec = config
    Tm = torch.empty(A.shape, dtype=dtype, device=A.device)
    nt, nbh = lay.chunk_grid(H)
    td.delta_solve_kernel[(nt, nbh)](A, beta, Tm, lay.cu, lay.chunk_idx, T, H=H, BT=BT, BETA=beta is not None,
                                     PREC=prec, IS_VARLEN=lay.varlen)
    return Tm


def kkt_solve(a, b, gates: Gates, lay: Layout, beta=None) -> torch.Tensor:
    """T = (I + diag(β) strict_lower(M^{ab}))⁻¹ per chunk, [B,T,H,BT] (dtype: solve_config), the
    scores formed in the solve's own kernel (no decay or a scalar one; b may be a itself); with a
    decay along K the scores are a kernel of their own (chunk_scores) and `solve` reads them."""
    config = solve_config(a)
    if gates.use["gk"]:
        return solve(_scores(a, b, gates, lay), lay, config, beta)
    B, T, H, K = a.shape
    Tm = torch.empty(B, T, H, BT, dtype=config[0], device=a.device)
    nt, nbh = lay.chunk_grid(H)
    td.delta_kkt_solve_kernel[(nt, nbh)](
        a, b, beta, gates.cum["g"], gates.stat["g"], Tm, lay.cu, lay.chunk_idx, T, H=H, D=K, BT=BT,
        USE_G=gates.use["g"], G_STATIC=gates.static["g"], BETA=beta is not None, SAME=a is b, PREC=config[1],
        IS_VARLEN=lay.varlen,
    )
    return Tm


def wu(k, v, Tm, Bm, gates: Gates, lay: Layout, beta=None):
    """W̃ = T (k ⊙ Γ) [B,T,H,K], U = T B v [B,T,H,V], in the state buffers' dtype; with beta
    (k the key w of e = β w) W̃ = T (β k ⊙ Γ) and U = T (β v), Bm unused."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = state_buffer_dtype(k)
    Wt = torch.empty(B, T, H, K, dtype=dt, device=k.device)
    U = torch.empty(B, T, H, V, dtype=dt, device=k.device)
    nt, nbh = lay.chunk_grid(H)
    c, s = gates.cum, gates.stat
    td.delta_wu_kernel[(nt, nbh)](
        k, v, beta, c["g"], c["gk"], s["g"], s["gk"], Tm, Bm, Wt, U, lay.cu, lay.chunk_idx, T,
        H=H, K=K, V=V, BT=BT, BETA=beta is not None, IS_VARLEN=lay.varlen, **_kw(gates),
    )
    return Wt, U


def states(k, v, w, Wt, U, gates: Gates, h0, lay: Layout, store_ht: bool, beta=None, reads: bool = False):
    """h [n_chunks,H,K,V] (the state before every chunk), R [B,T,H,V], ht [N,H,K,V] fp32 or None.
    beta [B,T,H]: W̃, U are those of e = β k (k the key; w unused) and R holds the new values Ũ,
    or with `reads` the general form's values read, β v - Ũ (what the backward kernels take)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    h = torch.empty(lay.n_chunks, H, K, V, dtype=state_buffer_dtype(k), device=k.device)
    R = torch.empty(B, T, H, V, dtype=state_buffer_dtype(k), device=k.device)
    ht = torch.zeros(lay.N, H, K, V, dtype=torch.float32, device=k.device) if store_ht else None
    c, s = gates.cum, gates.stat
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), lay.N * H)  # noqa: E731
    td.delta_state_fwd_kernel[grid](
        k, v, w, beta, c["g"], c["gk"], s["g"], s["gk"], Wt, U, h, R, h0, ht, lay.cu, lay.chunk_off, T,
        H=H, K=K, V=V, BT=BT, BK=_full_k(K), HAS_H0=h0 is not None, STORE_HT=store_ht, BETA=beta is not None, BETA_R=reads,
        IS_VARLEN=lay.varlen, **_kw(gates),
    )
    return h, R, ht


class Prepared:
    """What both passes need: the scores B (and P, Q with a decay along K), W̃, U."""

    def __init__(self, q, k, w, v, Tm, gates: Gates, lay: Layout):
        self.Bm = _scores(k, k, gates, lay)
        self.Wt, self.U = wu(k, v, Tm, self.Bm, gates, lay)
        self.P = self.Q = None
        if gates.use["gk"]:  # without one the readers form P and Q themselves
            self.P, self.Q = _scores(q, k, gates, lay), _scores(q, w, gates, lay)

    @classmethod
    def scores_only(cls, q, k, w, gates: Gates, lay: Layout) -> "Prepared":
        """The score buffers the backward reads (B, P, Q: with a decay along K only), no W̃, U."""
        self = cls.__new__(cls)
        self.Wt = self.U = self.Bm = self.P = self.Q = None
        if gates.use["gk"]:
            self.Bm, self.P, self.Q = _scores(k, k, gates, lay), _scores(q, k, gates, lay), _scores(q, w, gates, lay)
        return self


def delta_forward(q, k, v, w, gates: Gates, h0, lay: Layout, store_ht: bool, beta=None):
    """Returns (o [B,T,H,V] in q.dtype, ht or None, T [B,T,H,BT] in solve_config's dtype).

    With beta [B,T,H] the write key is β k and the removal key k itself (w is not read): fla's
    form, in which the scores k kᵀ, T, W̃ = T (β k ⊙ Γ), U = T (β v) and the new values
    Ũ = U - W̃ h need one state product per chunk, and o = (q ⊙ Γ) h + Q Ũ one score matrix. T is
    the same as the general form's for e = β k, so the backward (general) reads it unchanged."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if beta is None:
        Tm = kkt_solve(k, w, gates, lay)
        prep = Prepared(q, k, w, v, Tm, gates, lay)
        Wt, U, P, Q = prep.Wt, prep.U, prep.P, prep.Q
    else:
        w = k
        Tm = kkt_solve(k, k, gates, lay, beta)
        Wt, U = wu(k, v, Tm, None, gates, lay, beta)
        P, Q = None, (_scores(q, k, gates, lay) if gates.use["gk"] else None)
    h, R, ht = states(k, v, w, Wt, U, gates, h0, lay, store_ht, beta=beta)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    nt, nbh = lay.chunk_grid(H)
    c, s = gates.cum, gates.stat
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt, nbh)  # noqa: E731
    td.delta_output_kernel[grid](
        q, k, w, v, h, R, c["g"], c["gk"], s["g"], s["gk"], P, Q, o, lay.cu, lay.chunk_idx, T,
        H=H, K=K, V=V, BT=BT, BETA=beta is not None, IS_VARLEN=lay.varlen, **_kw(gates),
    )
    return o, ht, Tm


def delta_backward(q, k, v, w, do, dht, gates: Gates, h0, Tm, lay: Layout, beta=None):
    """Gradients (dq, dk, dv, dw in the input dtype, dh0 fp32 or None, dg or dgk per token fp32 or
    None, dβ or None). beta [B,T,H]: k = β w (keyed_backward), so the states and R are recomputed
    in fla's form, and the kernels return the key's whole gradient as dw and dβ [B,T,H] fp32
    (dk None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    do = do.contiguous()
    c, s, kw = gates.cum, gates.stat, _kw(gates)
    if beta is None:
        prep = Prepared(q, k, w, v, Tm, gates, lay)
        h, R, _ = states(k, v, w, prep.Wt, prep.U, gates, h0, lay, False)
    else:
        Wt, U = wu(w, v, Tm, None, gates, lay, beta)
        h, R, _ = states(w, v, w, Wt, U, gates, h0, lay, False, beta=beta, reads=True)
        prep = Prepared.scores_only(q, k, w, gates, lay)
    nt, nbh = lay.chunk_grid(H)
    f32 = dict(dtype=torch.float32, device=q.device)
    # dX_loc = -Tᵀ Qᵀ dO and W̄ = Tᵀ (w ⊙ Γ_out); the reverse sweep turns dX_loc into dX in place
    dX = torch.empty(B, T, H, V, **f32)
    Wb = torch.empty(B, T, H, K, dtype=state_buffer_dtype(k), device=q.device)
    td.delta_bwd_local_kernel[(nt, nbh)](
        q, w, do, c["g"], c["gk"], s["g"], s["gk"], Tm, prep.Q, dX, Wb, lay.cu, lay.chunk_idx, T,
        H=H, K=K, V=V, BT=BT, IS_VARLEN=lay.varlen, **kw,
    )
    dh = torch.empty_like(h)
    dh0 = torch.empty(lay.N, H, K, V, **f32) if h0 is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), lay.N * H)  # noqa: E731
    td.delta_state_bwd_kernel[grid](
        q, k, do, c["g"], c["gk"], s["g"], s["gk"], Wb, dX, dh, dht, dh0, lay.cu, lay.chunk_off, T,
        H=H, K=K, V=V, BT=BT, BK=_full_k(K), HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=lay.varlen, **kw,
    )
    dv = torch.empty_like(v)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt, nbh)  # noqa: E731
    td.delta_dv_kernel[grid](
        q, k, do, dX, dh, c["g"], c["gk"], s["g"], s["gk"], prep.P, prep.Bm, dv, lay.cu, lay.chunk_idx, T,
        H=H, K=K, V=V, BT=BT, IS_VARLEN=lay.varlen, **kw,
    )
    dM = [torch.empty(B, T, H, BT, **f32) for _ in range(4)]  # dA, dB, dP, dQ
    scalar = gates.use["g"]
    td.delta_dM_kernel[(nt, nbh)](
        v, do, R, dX, c["g"], s["g"], *dM, lay.cu, lay.chunk_idx, T, H=H, V=V, BT=BT,
        USE_G=scalar, G_STATIC=gates.static["g"], IS_VARLEN=lay.varlen,
    )
    dq, dw = torch.empty_like(q), torch.empty_like(w)
    keyed = beta is not None
    dk = None if keyed else torch.empty_like(k)
    nkt = triton.cdiv(K, 32)  # the most K tiles of any configuration (partial sums per tile, zeroed)
    dbeta = torch.zeros(nkt, B, T, H, **f32) if keyed else torch.zeros(1, **f32)
    dG = None
    if gates.use["gk"]:
        parts = gate_grad_parts((B, T, H, K), (lay.n_chunks, H, K), q.device)
        grid = lambda meta: (triton.cdiv(K, meta["BK"]), nt * (BT // BC), nbh)  # noqa: E731
        td.delta_dqkw_gk_kernel[grid](
            q, k, w, v, do, h, dh, R, dX, c["gk"], s["gk"], *dM, dq, dk, dw, *parts, beta, dbeta, lay.cu, lay.chunk_idx,
            T, B * T, H=H, K=K, V=V, BT=BT, BC=BC, GK_STATIC=gates.static["gk"], KEYED=keyed, IS_VARLEN=lay.varlen,
        )
        dG = gate_grad(*parts, lay)
    else:
        # one partial sum per K tile (the largest tile count is K / 32), zeroed: the kernel may use
        # fewer tiles than allocated; without a gate, placeholders (the tuner zeroes them too)
        tiles = gate_grad_parts((nkt, B, T, H) if scalar else (1,), (nkt, lay.n_chunks, H) if scalar else (1,),
                                q.device, zero=True)
        grid = lambda meta: (triton.cdiv(K, meta["BK"]), nt, nbh)  # noqa: E731
        td.delta_dqkw_kernel[grid](
            q, k, w, v, do, h, dh, R, dX, c["g"], s["g"], *dM, dq, dk, dw, *tiles, beta, dbeta, lay.cu,
            lay.chunk_idx, T, B * T, lay.n_chunks, H=H, K=K, V=V, BT=BT, USE_G=scalar, G_STATIC=gates.static["g"],
            KEYED=keyed, IS_VARLEN=lay.varlen,
        )
        if scalar:
            dG = gate_grad(*(x.sum(0) for x in tiles), lay)
    return dq, dk, dv, dw, dh0, dG, (dbeta.sum(0) if keyed else None)


def keyed_backward(q, k, v, beta, do, dht, gates: Gates, h0, Tm, lay: Layout):
    """The gradients of fla's form (write key β k, removal key k) through the general backward:
    e = β k is formed for it (the forward never forms it), and the key's gradient sums its parts
    as the write and as the removal key (summed in the dq dk kernels). Returns (dq, dk, dv,
    dβ [B,T,H] fp32, dh0, dG)."""
    e = (beta[..., None] * k).to(k.dtype)
    dq, _, dv, dk, dh0, dG, dbeta = delta_backward(q, e, v, k, do, dht, gates, h0, Tm, lay, beta=beta)
    return dq, dk, dv, dbeta, dh0, dG


class DeltaEOS(torch.autograd.Function):
    """The delta rule with its write key k and removal key w; with beta [B,T,H] (w None) the
    write key is β k and the removal key k: fla's form (delta_forward)."""

    @staticmethod
    def forward(ctx, q, k, v, w, g, gk, beta, h0, output_final_state, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        w = None if w is None else w.contiguous()
        beta = None if beta is None else beta.contiguous()
        ctx.h0_dtype = None if h0 is None else h0.dtype
        h0 = None if h0 is None else h0.float().contiguous()
        lay = Layout(q.shape[0], q.shape[1], cu_seqlens, q.device, block=BT)
        gates = Gates(Decay(g=g, gk=gk), lay)
        o, ht, Tm = delta_forward(q, k, v, w, gates, h0, lay, store_ht=output_final_state, beta=beta)
        ctx.save_for_backward(q, k, v, w, g, gk, beta, h0, Tm, cu_seqlens)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, w, g, gk, beta, h0, Tm, cu_seqlens = ctx.saved_tensors
        lay = Layout(q.shape[0], q.shape[1], cu_seqlens, q.device, block=BT)
        decay = Decay(g=g, gk=gk)
        gates = Gates(decay, lay)
        dht = None if dht is None else dht.float().contiguous()
        dbeta = None
        if beta is None:
            dq, dk, dv, dw, dh0, dG, _ = delta_backward(q, k, v, w, do, dht, gates, h0, Tm, lay)
        else:
            dq, dk, dv, dbeta, dh0, dG = keyed_backward(q, k, v, beta, do, dht, gates, h0, Tm, lay)
            dbeta, dw = dbeta.to(beta.dtype), None
        grads = []
        for name, x in (("g", g), ("gk", gk)):
            if x is None:
                grads.append(None)
            elif decay.is_static(name):  # the same gate at every token
                grads.append(dG.sum((0, 1)).to(x.dtype))
            else:
                grads.append(dG.to(x.dtype))
        return (dq, dk, dv, dw, *grads, dbeta, None if dh0 is None else dh0.to(ctx.h0_dtype), None, None)


def delta_eos(q, k, v, decay: Decay, h0=None, output_final_state=False, cu_seqlens=None):
    """The chunked Triton recurrence for the delta rule (w with g and/or gk; see lcsm/kernels/api.py).
    A decay with beta takes fla's form when its w is k itself, else beta is folded into k."""
    decay = decay.fold_scalar()
    if decay.beta is not None and decay.w is not k:
        k, decay = decay.fold_beta(k)
    if decay.beta is None:
        return DeltaEOS.apply(q, k, v, decay.w, decay.g, decay.gk, None, h0, output_final_state, cu_seqlens)
    return DeltaEOS.apply(q, k, v, None, decay.g, decay.gk, decay.beta_per_token(*k.shape[:2]), h0,
                          output_final_state, cu_seqlens)
