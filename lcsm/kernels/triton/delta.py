"""Chunked Triton kernels for the delta rule: the K×K transition (I - w_t e_tᵀ) D_t, D_t none, a
scalar (g) or a decay along K (gk), each static or per token (g and gk together are folded into gk).

    m_t = (I - w_t e_tᵀ)(D_t ⊙ m_{t-1}) + e_t i_tᵀ = D_t ⊙ m_{t-1} + e_t i_tᵀ - w_t r_tᵀ,
    r_t = (D_t ⊙ m_{t-1})ᵀ e_t,       y_t = m_tᵀ s_t.

The WY / UT form, per chunk of BT = 64 tokens with state H at its start (q, k, v, w below are s,
e, i, w; G the chunk-local inclusive cumsum of the log decay, Γ = exp(G), Γ_out = exp(G_L - G) with
L the chunk's last row, and M^{xy}_{tj} = Σ_k x_tk y_jk exp(G_tk - G_jk) the decayed scores):

    A = strict_lower(M^{kw}), B = strict_lower(M^{kk}), P = lower(M^{qk}), Q = lower(M^{qw})
    T = (I + A)⁻¹                                 (delta_solve_kernel: 16×16 blocks in fp32,
                                                   stored in the inputs' dtype: solve_config)
    W̃ = T (K ⊙ Γ),  U = T B V                     (delta_wu_kernel)
    R = W̃ H + U                                   (the values read before each write)
    H_next = exp(G_L) ⊙ H + (K ⊙ Γ_out)ᵀ V - (W ⊙ Γ_out)ᵀ R       (delta_state_fwd_kernel, sequential)
    O = (Q_in ⊙ Γ) H + P V - Q R                  (delta_output_kernel, every chunk independent)

The scores come from the separable kernels' chunk_scores (chunk.py): with a decay along K they
are factored at a reference row inside the chunk, the 16×16 diagonal blocks element by element,
so no exponent is positive; with a scalar decay exp(G_t - G_j) is masked before exp. Without a
decay along K, A is formed inside the solve (delta_kkt_solve_kernel).

fla's form (BETA flags: e = β w with k the key w itself; docs/kernels.md): A = diag(β) M^{kk},
W̃ = T (β k ⊙ Γ), U = T (β v), R holds the new values Ũ = U - W̃ H, H_next = exp(G_L) ⊙ H +
(k ⊙ Γ_out)ᵀ Ũ and O = (Q_in ⊙ Γ) H + Q Ũ: no B, no P, one state product. The backward runs the
general form on e = β k, with R = β v - Ũ recomputed in this form (BETA_R) and the key's gradients
and dβ summed in the dq dk kernels (KEYED).

Backward (hand written; dR the gradient of R, dX = Tᵀ dR that of the right-hand side
X = (K ⊙ Γ) H + B V, dH' that of the state after the chunk):

    dR = -Qᵀ dO - (W ⊙ Γ_out) dH'    →   dX = dX_loc - W̄ dH',  dX_loc = -Tᵀ Qᵀ dO,  W̄ = Tᵀ (W ⊙ Γ_out)
    dH = exp(G_L) ⊙ dH' + (Q_in ⊙ Γ)ᵀ dO + (K ⊙ Γ)ᵀ dX            (delta_state_bwd_kernel, reverse)
    dV = Pᵀ dO + Bᵀ dX + (K ⊙ Γ_out) dH'                            (delta_dv_kernel)
    dA = -strict(dX Rᵀ), dB = strict(dX Vᵀ), dP = lower(dO Vᵀ), dQ = -lower(dO Rᵀ)   (delta_dM_kernel)
    then dq, dk, dw from the score gradients (through the decays) and the state terms
    (delta_dqkw_kernel, delta_dqkw_gk_kernel), and the gate gradient from the identity

    d(cumulative log gate)_t = q ⊙ dq - k ⊙ dk_col + k ⊙ dk_row - w ⊙ dw_col   (row / column sides of
    the scores), assembled within each chunk by chunk_gate_grad_kernel (chunk.py) together with the
    Γ_out terms and the chunk's state term, as for the separable forms.

(I + A) R = X is differentiated implicitly (dA = -dX Rᵀ), so T is never differentiated. Only T is
kept from the forward (fp32); the backward recomputes W̃, U, the states and R.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk import (
    TUNE,
    _chunk_coords,
    _gate,
    _gate_row,
    _gate_scalar,
    _intra_backward,
    _intra_forward,
    _load_rows,
    _seq_coords,
    autotune,
)


def autotune_rw(configs, key, **hooks):
    """autotune for kernels that are not idempotent: the tuner runs every configuration on the
    real arguments, so a buffer updated in place is restored (restore_value) and partial sums that
    a configuration may leave unwritten are zeroed (reset_to_zero) around every trial."""
    return triton.autotune(configs=configs if TUNE else configs[:1], key=key, **hooks)

# --------------------------------------------------------------------------- helpers


@triton.jit
def _load_sq(X, row0, r, m_r, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Rows r of a chunk's [BT, BT] matrix stored per token X [.., T, H, BT]: [BT, BT] in X's dtype."""
    return tl.load(X + ((row0 + r)[:, None] * H + i_h) * BT + r[None, :], mask=m_r[:, None], other=0.0)


@triton.jit
def _load_sq_t(X, row0, r, m_r, i_h, H: tl.constexpr, BT: tl.constexpr):
    """The transpose of the same, out[j, t] = X[t, j]: loaded by rows (coalesced), transposed in registers."""
    return tl.trans(_load_sq(X, row0, r, m_r, i_h, H, BT))


@triton.jit
def _store_sq(X, b, row0, r, m_r, i_h, H: tl.constexpr, BT: tl.constexpr):
    tl.store(X + ((row0 + r)[:, None] * H + i_h) * BT + r[None, :], b, mask=m_r[:, None])


@triton.jit
def _scalar_pairs(g, gs, row0, r, last, i_h, H: tl.constexpr, G_STATIC: tl.constexpr):
    """exp(G_t - G_j) for j <= t (1 elsewhere, to be masked by the caller): [BT, BT]; exponents <= 0."""
    b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
    return tl.exp(tl.where(r[:, None] >= r[None, :], b_g[:, None] - b_g[None, :], 0.0))


@triton.jit
def _row_beta(beta, row0, r, m_r, i_h, H: tl.constexpr):
    """β at rows r of a chunk (beta [.., T, H]), fp32, 0 outside."""
    return tl.load(beta + (row0 + r) * H + i_h, mask=m_r, other=0.0).to(tl.float32)


@triton.jit
def _inv16x4(N1, N2, N3, N4):
    """(I + A_bb)⁻¹ of the four 16×16 diagonal blocks of a chunk given N_b = -A_bb (strictly
    lower, fp32, in registers), by forward substitution: row i of N = T - I is
    -A_i - Σ_{j<i} A_ij N_j. The four blocks are independent: one loop carries all four so that
    their dependent steps overlap. Rows that are zero (past the end of the sequence) give rows of I."""
    o = tl.arange(0, 16)
    b1, b2, b3, b4 = N1, N2, N3, N4
    for i in range(1, 16):
        row = (o == i)[:, None]
        a1 = tl.sum(tl.where(row, N1, 0.0), 0)  # row i of -A: zero at j >= i
        a2 = tl.sum(tl.where(row, N2, 0.0), 0)
        a3 = tl.sum(tl.where(row, N3, 0.0), 0)
        a4 = tl.sum(tl.where(row, N4, 0.0), 0)
        a1 = a1 + tl.sum(a1[:, None] * b1, 0)  # rows j < i of b hold N_j already
        a2 = a2 + tl.sum(a2[:, None] * b2, 0)
        a3 = a3 + tl.sum(a3[:, None] * b3, 0)
        a4 = a4 + tl.sum(a4[:, None] * b4, 0)
        b1 = tl.where(row, a1[None, :], b1)
        b2 = tl.where(row, a2[None, :], b2)
        b3 = tl.where(row, a3[None, :], b3)
        b4 = tl.where(row, a4[None, :], b4)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    return b1 + eye, b2 + eye, b3 + eye, b4 + eye


@triton.jit
def _solve_store(A11, A21, A22, A31, A32, A33, A41, A42, A43, A44, Tm, row0, last, i_h, H: tl.constexpr, BT: tl.constexpr,
                 PREC: tl.constexpr):
    """Tm = (I + A)⁻¹ of one chunk from the ten 16×16 blocks of its strictly lower A (the diagonal
    ones strictly lower too, fp32): the diagonal blocks by forward substitution, those below from
    T_ij = -T_ii Σ_{j<=l<i} A_il T_lj, fp32 with products of precision PREC ("ieee": exact fp32 on the
    FMA units; "tf32x3": three tf32 tensor-core products, close to fp32; "tf32": 10 bits). Stores
    full rows [.., T, H, BT] in Tm's dtype, zero above the diagonal."""
    T11, T22, T33, T44 = _inv16x4(-A11, -A22, -A33, -A44)
    T21 = -tl.dot(tl.dot(T22, A21, input_precision=PREC), T11, input_precision=PREC)
    T32 = -tl.dot(tl.dot(T33, A32, input_precision=PREC), T22, input_precision=PREC)
    T43 = -tl.dot(tl.dot(T44, A43, input_precision=PREC), T33, input_precision=PREC)
    T31 = -tl.dot(T33, tl.dot(A31, T11, input_precision=PREC) + tl.dot(A32, T21, input_precision=PREC),
                  input_precision=PREC)
    T42 = -tl.dot(T44, tl.dot(A42, T22, input_precision=PREC) + tl.dot(A43, T32, input_precision=PREC),
                  input_precision=PREC)
    T41 = -tl.dot(T44, tl.dot(A41, T11, input_precision=PREC) + tl.dot(A42, T21, input_precision=PREC)
                  + tl.dot(A43, T31, input_precision=PREC), input_precision=PREC)
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store16(Tm, T11, row0, 0, 0, last, i_h, H, BT)
    _store16(Tm, zero, row0, 0, 16, last, i_h, H, BT)
    _store16(Tm, zero, row0, 0, 32, last, i_h, H, BT)
    _store16(Tm, zero, row0, 0, 48, last, i_h, H, BT)
    _store16(Tm, T21, row0, 16, 0, last, i_h, H, BT)
    _store16(Tm, T22, row0, 16, 16, last, i_h, H, BT)
    _store16(Tm, zero, row0, 16, 32, last, i_h, H, BT)
    _store16(Tm, zero, row0, 16, 48, last, i_h, H, BT)
    _store16(Tm, T31, row0, 32, 0, last, i_h, H, BT)
    _store16(Tm, T32, row0, 32, 16, last, i_h, H, BT)
    _store16(Tm, T33, row0, 32, 32, last, i_h, H, BT)
    _store16(Tm, zero, row0, 32, 48, last, i_h, H, BT)
    _store16(Tm, T41, row0, 48, 0, last, i_h, H, BT)
    _store16(Tm, T42, row0, 48, 16, last, i_h, H, BT)
    _store16(Tm, T43, row0, 48, 32, last, i_h, H, BT)
    _store16(Tm, T44, row0, 48, 48, last, i_h, H, BT)


@triton.jit
def _block16(A, beta, row0, r0, c0, last, i_h, H: tl.constexpr, BT: tl.constexpr, BETA: tl.constexpr):
    """The 16×16 block of A (diag(β) A with BETA) at rows r0.., columns c0.. (c0 <= r0), zero past
    the end; a diagonal block (c0 = r0) keeps its strictly lower part only."""
    o = tl.arange(0, 16)
    m_o = (r0 + o) <= last
    b = tl.load(A + ((row0 + r0 + o)[:, None] * H + i_h) * BT + (c0 + o)[None, :], mask=m_o[:, None], other=0.0)
    b = tl.where((o[:, None] > o[None, :]) | (c0 < r0), b, 0.0)
    if BETA:
        b *= _row_beta(beta, row0, r0 + o, m_o, i_h, H)[:, None]
    return b


@triton.jit
def _store16(X, b, row0, r0, c0, last, i_h, H: tl.constexpr, BT: tl.constexpr):
    o = tl.arange(0, 16)
    tl.store(X + ((row0 + r0 + o)[:, None] * H + i_h) * BT + (c0 + o)[None, :], b.to(X.dtype.element_ty),
             mask=((r0 + o) <= last)[:, None])


@triton.jit
def _store_key_grads(dk, dw, beta, dbeta, p, m, row0, r, m_r, i_h, i_k, NTOT, b_dk, b_dw, f_w, H: tl.constexpr,
                     KEYED: tl.constexpr):
    """Store the gradients of the write key (dk) and the removal key (dw), fp32 [R, BK] each; KEYED
    (k = β w): the key's whole gradient dw + β dk into dw, and Σ_k w ⊙ dk (this K tile's part of
    dβ) into dbeta [n_ktiles, .., T, H]."""
    if KEYED:
        b_beta = _row_beta(beta, row0, r, m_r, i_h, H)
        tl.store(dw + p, (b_dw + b_beta[:, None] * b_dk).to(dw.dtype.element_ty), mask=m)
        tl.store(dbeta + (i_k * NTOT + row0 + r) * H + i_h, tl.sum(f_w * b_dk, axis=1), mask=m_r)
    else:
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
        tl.store(dw + p, b_dw.to(dw.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- forward


@autotune([triton.Config({}, num_warps=2), triton.Config({}, num_warps=4), triton.Config({}, num_warps=1)], key=["H", "PREC"])
@triton.jit(do_not_specialize=["T"])
def delta_solve_kernel(A, beta, Tm, cu, chunk_idx, T, H: tl.constexpr, BT: tl.constexpr, BETA: tl.constexpr,
                       PREC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Tm = (I + A)⁻¹ per chunk (BT = 64), A strictly lower [.., T, H, BT] fp32 (the kernel reads
    only its strict lower part; with BETA, A's rows are scaled by β [.., T, H] as read): the solve
    of _solve_store on scores computed elsewhere (a decay along K: chunk_scores_decay_kernel)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    _solve_store(
        _block16(A, beta, row0, 0, 0, last, i_h, H, BT, BETA),
        _block16(A, beta, row0, 16, 0, last, i_h, H, BT, BETA), _block16(A, beta, row0, 16, 16, last, i_h, H, BT, BETA),
        _block16(A, beta, row0, 32, 0, last, i_h, H, BT, BETA), _block16(A, beta, row0, 32, 16, last, i_h, H, BT, BETA),
        _block16(A, beta, row0, 32, 32, last, i_h, H, BT, BETA),
        _block16(A, beta, row0, 48, 0, last, i_h, H, BT, BETA), _block16(A, beta, row0, 48, 16, last, i_h, H, BT, BETA),
        _block16(A, beta, row0, 48, 32, last, i_h, H, BT, BETA), _block16(A, beta, row0, 48, 48, last, i_h, H, BT, BETA),
        Tm, row0, last, i_h, H, BT, PREC,
    )


@autotune([triton.Config({"BD": 64}, num_warps=4), triton.Config({"BD": 32}, num_warps=2),
           triton.Config({"BD": 64}, num_warps=2), triton.Config({"BD": 128}, num_warps=4),
           triton.Config({"BD": 64}, num_warps=1), triton.Config({"BD": 32}, num_warps=1)],
          key=["H", "D", "USE_G", "BETA", "SAME", "PREC"])
@triton.jit(do_not_specialize=["T"])
def delta_kkt_solve_kernel(a, b, beta, g, gs, Tm, cu, chunk_idx, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                           BD: tl.constexpr, USE_G: tl.constexpr, G_STATIC: tl.constexpr, BETA: tl.constexpr,
                           SAME: tl.constexpr, PREC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Tm = (I + A)⁻¹ with A = strict_lower((a bᵀ) ⊙ exp(G_t - G_j)) (row-scaled by β with BETA)
    formed here, one chunk per program, for no decay or a scalar one: the scores and the solve in one
    pass (with a decay along K the scores come from chunk_scores_decay_kernel and delta_solve_kernel).
    a, b [.., T, H, D] (SAME: b is a, loaded once); the ten 16×16 blocks accumulate over D tiles."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    o = tl.arange(0, 16)
    r1, r2, r3, r4 = o, 16 + o, 32 + o, 48 + o
    m1, m2, m3, m4 = r1 <= last, r2 <= last, r3 <= last, r4 <= last
    A11 = tl.zeros([16, 16], dtype=tl.float32)
    A21, A22 = tl.zeros([16, 16], dtype=tl.float32), tl.zeros([16, 16], dtype=tl.float32)
    A31, A32, A33 = tl.zeros([16, 16], dtype=tl.float32), tl.zeros([16, 16], dtype=tl.float32), tl.zeros([16, 16], dtype=tl.float32)
    A41, A42 = tl.zeros([16, 16], dtype=tl.float32), tl.zeros([16, 16], dtype=tl.float32)
    A43, A44 = tl.zeros([16, 16], dtype=tl.float32), tl.zeros([16, 16], dtype=tl.float32)
    for i_d in range(tl.cdiv(D, BD)):
        cols = i_d * BD + tl.arange(0, BD)
        m_c = cols < D
        a1 = _load_rows(a, row0, r1, m1, i_h, cols, m_c, H, D)
        a2 = _load_rows(a, row0, r2, m2, i_h, cols, m_c, H, D)
        a3 = _load_rows(a, row0, r3, m3, i_h, cols, m_c, H, D)
        a4 = _load_rows(a, row0, r4, m4, i_h, cols, m_c, H, D)
        if SAME:
            b1, b2, b3, b4 = tl.trans(a1), tl.trans(a2), tl.trans(a3), tl.trans(a4)
        else:
            b1 = tl.trans(_load_rows(b, row0, r1, m1, i_h, cols, m_c, H, D))
            b2 = tl.trans(_load_rows(b, row0, r2, m2, i_h, cols, m_c, H, D))
            b3 = tl.trans(_load_rows(b, row0, r3, m3, i_h, cols, m_c, H, D))
            b4 = tl.trans(_load_rows(b, row0, r4, m4, i_h, cols, m_c, H, D))
        A11 += tl.dot(a1, b1)
        A21 += tl.dot(a2, b1)
        A22 += tl.dot(a2, b2)
        A31 += tl.dot(a3, b1)
        A32 += tl.dot(a3, b2)
        A33 += tl.dot(a3, b3)
        A41 += tl.dot(a4, b1)
        A42 += tl.dot(a4, b2)
        A43 += tl.dot(a4, b3)
        A44 += tl.dot(a4, b4)
    strict = o[:, None] > o[None, :]
    if USE_G:  # exp(G_t - G_j) <= 1 for t > j; the diagonal blocks masked before exp
        g1 = _gate_scalar(g, gs, row0, r1, last, i_h, H, G_STATIC)
        g2 = _gate_scalar(g, gs, row0, r2, last, i_h, H, G_STATIC)
        g3 = _gate_scalar(g, gs, row0, r3, last, i_h, H, G_STATIC)
        g4 = _gate_scalar(g, gs, row0, r4, last, i_h, H, G_STATIC)
        A11 *= tl.exp(tl.where(strict, g1[:, None] - g1[None, :], 0.0))
        A22 *= tl.exp(tl.where(strict, g2[:, None] - g2[None, :], 0.0))
        A33 *= tl.exp(tl.where(strict, g3[:, None] - g3[None, :], 0.0))
        A44 *= tl.exp(tl.where(strict, g4[:, None] - g4[None, :], 0.0))
        A21 *= tl.exp(g2[:, None] - g1[None, :])
        A31 *= tl.exp(g3[:, None] - g1[None, :])
        A32 *= tl.exp(g3[:, None] - g2[None, :])
        A41 *= tl.exp(g4[:, None] - g1[None, :])
        A42 *= tl.exp(g4[:, None] - g2[None, :])
        A43 *= tl.exp(g4[:, None] - g3[None, :])
    A11, A22 = tl.where(strict, A11, 0.0), tl.where(strict, A22, 0.0)
    A33, A44 = tl.where(strict, A33, 0.0), tl.where(strict, A44, 0.0)
    if BETA:
        be1 = _row_beta(beta, row0, r1, m1, i_h, H)[:, None]
        be2 = _row_beta(beta, row0, r2, m2, i_h, H)[:, None]
        be3 = _row_beta(beta, row0, r3, m3, i_h, H)[:, None]
        be4 = _row_beta(beta, row0, r4, m4, i_h, H)[:, None]
        A11 *= be1
        A21, A22 = A21 * be2, A22 * be2
        A31, A32, A33 = A31 * be3, A32 * be3, A33 * be3
        A41, A42, A43, A44 = A41 * be4, A42 * be4, A43 * be4, A44 * be4
    _solve_store(A11, A21, A22, A31, A32, A33, A41, A42, A43, A44, Tm, row0, last, i_h, H, BT, PREC)


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4), triton.Config({"BK": 32, "BV": 32}, num_warps=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8), triton.Config({"BK": 128, "BV": 128}, num_warps=8)],
    key=["H", "K", "V", "USE_G", "USE_GK", "BETA"],
)
@triton.jit(do_not_specialize=["T"])
def delta_wu_kernel(
    k, v, beta, g, gk, gs, gks, Tm, Bm, Wt, U, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    BETA: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """W̃ = T (k ⊙ Γ) and U = T B v for one chunk (T, B from their buffers), the products in T's
    dtype (fp32 T: tf32; bf16 T: bf16, fp32 sums). With BETA (e = β w, k the key w):
    W̃ = T (β k ⊙ Γ) and U = T (β v), the values each token writes before the state's part is taken
    off (B is not read)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    b_T = _load_sq(Tm, row0, r, m_r, i_h, H, BT)
    if BETA:
        b_beta = _row_beta(beta, row0, r, m_r, i_h, H)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
        if BETA:
            b_k *= b_beta[:, None]
        if USE_GK:
            b_k *= tl.exp(_gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC))
        if USE_G:
            b_k *= tl.exp(_gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC))[:, None]
        b_w = tl.dot(b_T, b_k.to(b_T.dtype))
        tl.store(Wt + ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :], b_w.to(Wt.dtype.element_ty), mask=m_r[:, None] & m_k[None, :])
    if not BETA:
        b_B = tl.where(r[:, None] > r[None, :], _load_sq(Bm, row0, r, m_r, i_h, H, BT), 0.0)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V).to(tl.float32)
        if BETA:
            b_u = tl.dot(b_T, (b_v * b_beta[:, None]).to(b_T.dtype))
        else:
            b_u = tl.dot(b_T, tl.dot(b_B, b_v).to(b_T.dtype))
        tl.store(U + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_u.to(U.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])


@autotune(
    [triton.Config({"BV": 32}, num_warps=4, num_stages=2), triton.Config({"BV": 16}, num_warps=4, num_stages=2),
     triton.Config({"BV": 32}, num_warps=8, num_stages=2), triton.Config({"BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BV": 16}, num_warps=2, num_stages=3), triton.Config({"BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BV": 64}, num_warps=4, num_stages=3), triton.Config({"BV": 32}, num_warps=4, num_stages=3),
     triton.Config({"BV": 32}, num_warps=2, num_stages=2)],
    key=["H", "K", "V", "USE_G", "USE_GK", "BETA"],
)
@triton.jit(do_not_specialize=["T"])
def delta_state_fwd_kernel(
    k, v, w, beta, g, gk, gs, gks, Wt, U, h, R, h0, ht, cu, chunk_off, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, BETA: tl.constexpr, BETA_R: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """h[c] = the state before chunk c and R = W̃ h_c + U (the values the chunk's tokens read),
    sequential over the chunks of a sequence; one program per (V tile, sequence·head) holds all
    of K (BK >= K), since R contracts the state over K:
    h_{c+1} = exp(G_L) ⊙ h_c + (k ⊙ Γ_out)ᵀ v - (w ⊙ Γ_out)ᵀ R.
    With BETA (e = β w, k the key w; U = T (β v) from delta_wu_kernel) the write and the removal
    share the key, so one product carries both: R holds the new values Ũ = U - W̃ h_c (what each
    token writes beyond what the memory already holds at its key) and
    h_{c+1} = exp(G_L) ⊙ h_c + (k ⊙ Γ_out)ᵀ Ũ. BETA_R (the backward's recompute): R holds the
    general form's values read, β v - Ũ, instead."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn, c0 = _seq_coords(i_n, T, cu, chunk_off, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    r = tl.arange(0, BT)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_nh * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
    for i_t in range(tl.cdiv(Tn, BT)):
        tl.store(h + (((c0 + i_t) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], b_h.to(h.dtype.element_ty), mask=m_kv)
        row0 = bos + i_t * BT
        last = tl.minimum(BT, Tn - i_t * BT) - 1
        m_r = r <= last
        b_wt = _load_rows(Wt, row0, r, m_r, i_h, o_k, m_k, H, K)
        b_u = _load_rows(U, row0, r, m_r, i_h, o_v, m_v, H, V).to(tl.float32)
        p_R = R + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :]
        if BETA:
            b_r = b_u - tl.dot(b_wt, b_h.to(b_wt.dtype))
            if BETA_R:
                b_bv = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V).to(tl.float32) * _row_beta(beta, row0, r, m_r, i_h, H)[:, None]
                tl.store(p_R, (b_bv - b_r).to(R.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])
            else:
                tl.store(p_R, b_r.to(R.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])
        else:
            b_r = tl.dot(b_wt, b_h.to(b_wt.dtype)) + b_u
            tl.store(p_R, b_r.to(R.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])
        b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)
        if not BETA:
            b_w = _load_rows(w, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
            b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        if USE_GK:
            b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_h *= tl.exp(b_gl)[:, None]
            b_out = tl.exp(b_gl[None, :] - b_g)
            b_k = (b_k * b_out).to(b_k.dtype)
            if not BETA:
                b_w *= b_out
        if USE_G:
            b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
            b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
            b_h *= tl.exp(b_gl)
            b_out = tl.exp(b_gl - b_g)[:, None]
            b_k = (b_k * b_out).to(b_k.dtype)
            if not BETA:
                b_w *= b_out
        if BETA:
            # Ũ is already the difference of the write and the removal: rounding it to the key's
            # dtype for the product loses nothing of the cancellation (fla's form)
            b_h += tl.dot(tl.trans(b_k), b_r.to(b_k.dtype))
        else:
            # the removal term in fp32 (tf32 on the GPU): with e ∥ w it nearly cancels the write
            # term when the memory already holds v at k, and rounding R to bf16 would not
            b_h += tl.dot(tl.trans(b_k), b_v) - tl.dot(tl.trans(b_w), b_r)
    if STORE_HT:
        tl.store(ht + (i_nh * K + o_k[:, None]) * V + o_v[None, :], b_h, mask=m_kv)


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2),
     triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=3),
     triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 32}, num_warps=2, num_stages=3)],
    key=["H", "K", "V", "USE_G", "USE_GK", "BETA"],
)
@triton.jit(do_not_specialize=["T"])
def delta_output_kernel(
    q, k, w, v, h, R, g, gk, gs, gks, P, Q, o, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    BETA: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """o = (q ⊙ Γ) h_c + P v - Q R for a whole chunk. P, Q come from the scores buffers with a decay
    along K, else they are (q kᵀ), (q wᵀ) ⊙ exp(G_t - G_j), computed here. With BETA (e = β w, R
    the new values Ũ of delta_state_fwd_kernel): P v - Q R = Q Ũ, so P and v are not read."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_P = tl.zeros([BT, BT], dtype=tl.float32)
    b_Q = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        if USE_GK:
            b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_o += tl.dot((b_q * tl.exp(b_g)).to(b_q.dtype), b_h.to(b_q.dtype))
        else:
            b_o += tl.dot(b_q, b_h.to(b_q.dtype))
            if not BETA:
                b_P += tl.dot(b_q, tl.trans(_load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)))
            b_Q += tl.dot(b_q, tl.trans(_load_rows(w, row0, r, m_r, i_h, o_k, m_k, H, K)))
    causal = r[:, None] >= r[None, :]
    if USE_G:
        b_o *= tl.exp(_gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC))[:, None]
        b_lam = _scalar_pairs(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_P *= b_lam
        b_Q *= b_lam
    if USE_GK:
        if not BETA:
            b_P = _load_sq(P, row0, r, m_r, i_h, H, BT)
        b_Q = _load_sq(Q, row0, r, m_r, i_h, H, BT)
    b_Q = tl.where(causal, b_Q, 0.0)
    b_r = _load_rows(R, row0, r, m_r, i_h, o_v, m_v, H, V)
    if BETA:
        b_o += tl.dot(b_Q.to(b_r.dtype), b_r)
    else:
        b_P = tl.where(causal, b_P, 0.0)
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_o += tl.dot(b_P.to(b_v.dtype), b_v) - tl.dot(b_Q.to(b_r.dtype), b_r)
    tl.store(o + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])


# --------------------------------------------------------------------------- backward


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4), triton.Config({"BK": 32, "BV": 32}, num_warps=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8), triton.Config({"BK": 128, "BV": 128}, num_warps=8)],
    key=["H", "K", "V", "USE_G", "USE_GK"],
)
@triton.jit(do_not_specialize=["T"])
def delta_bwd_local_kernel(
    q, w, do, g, gk, gs, gks, Tm, Q, dX, Wb, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The state-independent parts of dX = Tᵀ dR for one chunk: dX_loc = -Tᵀ Qᵀ dO (fp32) and
    W̄ = Tᵀ (w ⊙ Γ_out), so that the reverse sweep only adds -W̄ dH'."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    b_Tt = tl.trans(_load_sq(Tm, row0, r, m_r, i_h, H, BT).to(tl.float32))
    if USE_GK:
        b_Q = _load_sq(Q, row0, r, m_r, i_h, H, BT)
    else:
        b_Q = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_Q += tl.dot(_load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K), tl.trans(_load_rows(w, row0, r, m_r, i_h, o_k, m_k, H, K)))
        if USE_G:
            b_Q *= _scalar_pairs(g, gs, row0, r, last, i_h, H, G_STATIC)
    b_Qt = tl.trans(tl.where(r[:, None] >= r[None, :], b_Q, 0.0))
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V).to(tl.float32)
        b_dx = -tl.dot(b_Tt, tl.dot(b_Qt, b_do))
        tl.store(dX + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_dx, mask=m_r[:, None] & m_v[None, :])
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_w = _load_rows(w, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
        if USE_GK:
            b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_w *= tl.exp(b_gl[None, :] - b_g)
        if USE_G:
            b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
            b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
            b_w *= tl.exp(b_gl - b_g)[:, None]
        b_wb = tl.dot(b_Tt, b_w)
        tl.store(Wb + ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :], b_wb.to(Wb.dtype.element_ty), mask=m_r[:, None] & m_k[None, :])


@autotune_rw(
    [triton.Config({"BV": 32}, num_warps=4, num_stages=2), triton.Config({"BV": 16}, num_warps=4, num_stages=2),
     triton.Config({"BV": 32}, num_warps=8, num_stages=2), triton.Config({"BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BV": 16}, num_warps=2, num_stages=3)],
    key=["H", "K", "V", "USE_G", "USE_GK"], restore_value=["dX"],  # dX_loc -> dX in place
)
@triton.jit(do_not_specialize=["T"])
def delta_state_bwd_kernel(
    q, k, do, g, gk, gs, gks, Wb, dX, dh, dht, dh0, cu, chunk_off, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dh[c] = ∂L/∂(state after chunk c), sequential from the last chunk back, and dX (in place over
    dX_loc): dX = dX_loc - W̄ dh_c;  ∂L/∂h_c = exp(G_L) ⊙ dh_c + (q ⊙ Γ)ᵀ dO + (k ⊙ Γ)ᵀ dX.
    One program per (V tile, sequence·head) holds all of K; dh0 = ∂L/∂h_0."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn, c0 = _seq_coords(i_n, T, cu, chunk_off, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    r = tl.arange(0, BT)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + (i_nh * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
    NT = tl.cdiv(Tn, BT)
    for i_back in range(NT):
        i_t = NT - 1 - i_back
        tl.store(dh + (((c0 + i_t) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], b_dh.to(dh.dtype.element_ty), mask=m_kv)
        row0 = bos + i_t * BT
        last = tl.minimum(BT, Tn - i_t * BT) - 1
        m_r = r <= last
        b_wb = _load_rows(Wb, row0, r, m_r, i_h, o_k, m_k, H, K)
        p_dx = dX + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :]
        m_dx = m_r[:, None] & m_v[None, :]
        b_dx = tl.load(p_dx, mask=m_dx, other=0.0) - tl.dot(b_wb, b_dh.to(b_wb.dtype))
        tl.store(p_dx, b_dx, mask=m_dx)
        b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)
        b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        if USE_GK:
            b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_dh *= tl.exp(_gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC))[:, None]
            b_q = (b_q * tl.exp(b_g)).to(b_q.dtype)
            b_k *= tl.exp(b_g)
        if USE_G:
            b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
            b_dh *= tl.exp(_gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC))
            b_q = (b_q * tl.exp(b_g)[:, None]).to(b_q.dtype)
            b_k *= tl.exp(b_g)[:, None]
        b_dh += tl.dot(tl.trans(b_q), b_do) + tl.dot(tl.trans(b_k), b_dx)
    if STORE_DH0:
        tl.store(dh0 + (i_nh * K + o_k[:, None]) * V + o_v[None, :], b_dh, mask=m_kv)


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2),
     triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=3),
     triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 32}, num_warps=2, num_stages=3)],
    key=["H", "K", "V", "USE_G", "USE_GK"],
)
@triton.jit(do_not_specialize=["T"])
def delta_dv_kernel(
    q, k, do, dX, dh, g, gk, gs, gks, P, Bm, dv, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dv = Pᵀ dO + Bᵀ dX + (k ⊙ Γ_out) dh_c (P, B from the scores buffers with a decay along K,
    else computed here)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_Pt = tl.zeros([BT, BT], dtype=tl.float32)  # [j, t] = P[t, j]
    b_Bt = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        if USE_GK:
            b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_dv += tl.dot((b_k * tl.exp(b_gl[None, :] - b_g)).to(b_k.dtype), b_dh.to(b_k.dtype))
        else:
            b_dv += tl.dot(b_k, b_dh.to(b_k.dtype))
            b_Pt += tl.dot(b_k, tl.trans(_load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)))
            b_Bt += tl.dot(b_k, tl.trans(b_k))
    anticausal = r[:, None] <= r[None, :]
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
        b_dv *= tl.exp(b_gl - b_g)[:, None]
        b_lam = tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], 0.0))
        b_Pt *= b_lam
        b_Bt *= b_lam
    if USE_GK:
        b_Pt = _load_sq_t(P, row0, r, m_r, i_h, H, BT)
        b_Bt = _load_sq_t(Bm, row0, r, m_r, i_h, H, BT)
    b_Pt = tl.where(anticausal, b_Pt, 0.0)
    b_Bt = tl.where(r[:, None] < r[None, :], b_Bt, 0.0)
    b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
    b_dx = _load_rows(dX, row0, r, m_r, i_h, o_v, m_v, H, V)
    b_dv += tl.dot(b_Pt.to(b_do.dtype), b_do) + tl.dot(b_Bt, b_dx)
    tl.store(dv + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])


@autotune([triton.Config({"BV": 64}, num_warps=8), triton.Config({"BV": 32}, num_warps=4), triton.Config({"BV": 64}, num_warps=4)],
          key=["H", "V", "USE_G"])
@triton.jit(do_not_specialize=["T"])
def delta_dM_kernel(
    v, do, R, dX, g, gs, dA, dB, dP, dQ, cu, chunk_idx, T,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The gradients of the chunk's score matrices, [BT, BT] each, fp32:
    dA = -strict(dX Rᵀ), dB = strict(dX vᵀ), dP = lower(dO vᵀ), dQ = -lower(dO Rᵀ); with a
    scalar decay already multiplied by exp(G_t - G_j) (then the readers need only products)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dB = tl.zeros([BT, BT], dtype=tl.float32)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dQ = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_r = _load_rows(R, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_dx = _load_rows(dX, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_dA -= tl.dot(b_dx, tl.trans(b_r.to(tl.float32)))
        b_dB += tl.dot(b_dx, tl.trans(b_v.to(tl.float32)))
        b_dP += tl.dot(b_do, tl.trans(b_v))
        b_dQ -= tl.dot(b_do, tl.trans(b_r.to(b_do.dtype)))
    causal = r[:, None] >= r[None, :]
    strict = r[:, None] > r[None, :]
    if USE_G:
        b_lam = _scalar_pairs(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_dA *= b_lam
        b_dB *= b_lam
        b_dP *= b_lam
        b_dQ *= b_lam
    _store_sq(dA, tl.where(strict, b_dA, 0.0), row0, r, m_r, i_h, H, BT)
    _store_sq(dB, tl.where(strict, b_dB, 0.0), row0, r, m_r, i_h, H, BT)
    _store_sq(dP, tl.where(causal, b_dP, 0.0), row0, r, m_r, i_h, H, BT)
    _store_sq(dQ, tl.where(causal, b_dQ, 0.0), row0, r, m_r, i_h, H, BT)


@autotune_rw(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 32}, num_warps=4, num_stages=3),
     triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=3)],
    key=["H", "K", "V", "USE_G", "KEYED"], reset_to_zero=["dga", "dgb", "dgc", "dbeta"],  # one partial sum per K tile
)
@triton.jit(do_not_specialize=["T"])
def delta_dqkw_kernel(
    q, k, w, v, do, h, dh, R, dX, g, gs, dA, dB, dP, dQ, dq, dk, dw, dga, dgb, dgc, beta, dbeta, cu, chunk_idx, T, NTOT, NC,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, KEYED: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk, dw without a decay along K (none or scalar; dA.. carry exp(G_t - G_j) already):
    dq = (dO hᵀ) ⊙ Γ + dP k + dQ w
    dk = (dX hᵀ) ⊙ Γ + (v dhᵀ) ⊙ Γ_out + dA w + dB k + dBᵀ k + dPᵀ q
    dw = -(R dhᵀ) ⊙ Γ_out + dAᵀ k + dQᵀ q
    With a scalar decay, this K tile's parts of the gate gradient (chunk_gate_grad_kernel):
    dga = Σ_k q ⊙ dq + k ⊙ dk_row - k ⊙ dk_col - w ⊙ dw_col over the s != t terms (the
    diagonals of P and Q cancel exactly), dgb = Σ_k k ⊙ dk_out + w ⊙ dw_out, dgc = Σ exp(G_L) h ⊙ dh.
    KEYED (k = β w, fla's form): dw receives the key's whole gradient dw + β dk, and dbeta this K
    tile's part of Σ_k w ⊙ dk (dk itself is not stored)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO hᵀ
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # dX hᵀ
    b_dko = tl.zeros([BT, BK], dtype=tl.float32)  # v dhᵀ
    b_dwo = tl.zeros([BT, BK], dtype=tl.float32)  # -R dhᵀ
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_hv = m_k[None, :] & m_v[:, None]
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_hv, other=0.0)  # [BV, BK]
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_hv, other=0.0)
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_r = _load_rows(R, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_dx = _load_rows(dX, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype))
        b_dk += tl.dot(b_dx, b_h.to(tl.float32))
        b_dko += tl.dot(b_v, b_dh.to(b_v.dtype))
        b_dwo -= tl.dot(b_r, b_dh.to(b_r.dtype))
        if USE_G:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(b_g)[:, None]
        b_dko *= tl.exp(b_gl - b_g)[:, None]
        b_dwo *= tl.exp(b_gl - b_g)[:, None]
    b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)
    b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)
    b_w = _load_rows(w, row0, r, m_r, i_h, o_k, m_k, H, K)
    diag = r[:, None] == r[None, :]
    strict = r[:, None] > r[None, :]
    b_dA = _load_sq(dA, row0, r, m_r, i_h, H, BT).to(b_k.dtype)
    b_dB = _load_sq(dB, row0, r, m_r, i_h, H, BT).to(b_k.dtype)
    b_dP = _load_sq(dP, row0, r, m_r, i_h, H, BT)
    b_dQ = _load_sq(dQ, row0, r, m_r, i_h, H, BT)
    b_pd = tl.sum(tl.where(diag, b_dP, 0.0), axis=1)  # dP_tt = dO_t · v_t
    b_qd = tl.sum(tl.where(diag, b_dQ, 0.0), axis=1)  # dQ_tt = -dO_t · R_t
    b_dP = tl.where(strict, b_dP, 0.0).to(b_k.dtype)
    b_dQ = tl.where(strict, b_dQ, 0.0).to(b_k.dtype)
    b_dq += tl.dot(b_dP, b_k) + tl.dot(b_dQ, b_w)
    b_dk += tl.dot(b_dA, b_w) + tl.dot(b_dB, b_k)
    b_dkc = tl.dot(tl.trans(b_dB), b_k) + tl.dot(tl.trans(b_dP), b_q)
    b_dwc = tl.dot(tl.trans(b_dA), b_k) + tl.dot(tl.trans(b_dQ), b_q)
    f_q, f_k, f_w = b_q.to(tl.float32), b_k.to(tl.float32), b_w.to(tl.float32)
    p = ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :]
    m = m_r[:, None] & m_k[None, :]
    if USE_G:
        b_ga = tl.sum(f_q * b_dq + f_k * (b_dk - b_dkc) - f_w * b_dwc, axis=1)
        b_gb = tl.sum(f_k * b_dko + f_w * b_dwo, axis=1)
        tl.store(dga + (i_k * NTOT + row0 + r) * H + i_h, b_ga, mask=m_r)
        tl.store(dgb + (i_k * NTOT + row0 + r) * H + i_h, b_gb, mask=m_r)
        tl.store(dgc + (i_k * NC + i_c) * H + i_h, tl.sum(b_hdh) * tl.exp(b_gl))
    tl.store(dq + p, (b_dq + b_pd[:, None] * f_k + b_qd[:, None] * f_w).to(dq.dtype.element_ty), mask=m)
    _store_key_grads(dk, dw, beta, dbeta, p, m, row0, r, m_r, i_h, i_k, NTOT, b_dk + b_dkc + b_dko + b_pd[:, None] * f_q,
                     b_dwc + b_dwo + b_qd[:, None] * f_q, f_w, H, KEYED)


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4), triton.Config({"BK": 32, "BV": 32}, num_warps=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8), triton.Config({"BK": 32, "BV": 64}, num_warps=4),
     triton.Config({"BK": 64, "BV": 32}, num_warps=4)],
    key=["H", "K", "V", "KEYED"], reset_to_zero=["dbeta"],  # one partial sum per K tile
)
@triton.jit(do_not_specialize=["T"])
def delta_dqkw_gk_kernel(
    q, k, w, v, do, h, dh, R, dX, gk, gks, dA, dB, dP, dQ, dq, dk, dw, dga, dgb, dgc, beta, dbeta, cu, chunk_idx, T, NTOT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GK_STATIC: tl.constexpr, KEYED: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk, dw with a decay along K, one program per sub-chunk of BC rows: the formulas of
    delta_dqkw_kernel with every score product taken through exp(G_t - G_j) along K
    (_intra_forward / _intra_backward: factored at a reference row, the diagonal block element by
    element), and the parts of the gate gradient along K (dga, dgb per token, dgc per chunk);
    KEYED as there (_store_key_grads)."""
    i_k, i_tc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r0 = i_i * BC
    if r0 > last:
        return
    ri = r0 + tl.arange(0, BC)
    m_ri = ri <= last
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    b_dko = tl.zeros([BC, BK], dtype=tl.float32)
    b_dwo = tl.zeros([BC, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_hv = m_k[None, :] & m_v[:, None]
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_hv, other=0.0)
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_hv, other=0.0)
        b_do = _load_rows(do, row0, ri, m_ri, i_h, o_v, m_v, H, V)
        b_v = _load_rows(v, row0, ri, m_ri, i_h, o_v, m_v, H, V)
        b_r = _load_rows(R, row0, ri, m_ri, i_h, o_v, m_v, H, V)
        b_dx = _load_rows(dX, row0, ri, m_ri, i_h, o_v, m_v, H, V)
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype))
        b_dk += tl.dot(b_dx, b_h.to(tl.float32))
        b_dko += tl.dot(b_v, b_dh.to(b_v.dtype))
        b_dwo -= tl.dot(b_r, b_dh.to(b_r.dtype))
        if i_i == 0:  # one sub-chunk computes the chunk's state term
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
    b_gi = _gate(gk, gks, row0, ri, last, i_h, o_k, m_k, H, K, GK_STATIC)
    b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
    b_dq *= tl.exp(b_gi)
    b_dk *= tl.exp(b_gi)
    b_dko *= tl.exp(b_gl[None, :] - b_gi)
    b_dwo *= tl.exp(b_gl[None, :] - b_gi)
    # the strict parts of the scores (the diagonals of P and Q are added below, outside the gate terms)
    b_dq += _intra_forward(dP, k, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dq += _intra_forward(dQ, w, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dk += _intra_forward(dA, w, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dk += _intra_forward(dB, k, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dkc = _intra_backward(dB, k, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dkc += _intra_backward(dP, q, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dwc = _intra_backward(dA, k, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_dwc += _intra_backward(dQ, q, gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, BT, BC, GK_STATIC, True)
    b_pd = tl.load(dP + ((row0 + ri) * H + i_h) * BT + ri, mask=m_ri, other=0.0)  # dP_tt = dO_t · v_t
    b_qd = tl.load(dQ + ((row0 + ri) * H + i_h) * BT + ri, mask=m_ri, other=0.0)  # dQ_tt = -dO_t · R_t
    f_q = _load_rows(q, row0, ri, m_ri, i_h, o_k, m_k, H, K).to(tl.float32)
    f_k = _load_rows(k, row0, ri, m_ri, i_h, o_k, m_k, H, K).to(tl.float32)
    f_w = _load_rows(w, row0, ri, m_ri, i_h, o_k, m_k, H, K).to(tl.float32)
    p = ((row0 + ri)[:, None] * H + i_h) * K + o_k[None, :]
    m = m_ri[:, None] & m_k[None, :]
    tl.store(dga + p, f_q * b_dq + f_k * (b_dk - b_dkc) - f_w * b_dwc, mask=m)
    tl.store(dgb + p, f_k * b_dko + f_w * b_dwo, mask=m)
    if i_i == 0:
        tl.store(dgc + (i_c * H + i_h) * K + o_k, b_hdh * tl.exp(b_gl), mask=m_k)
    tl.store(dq + p, (b_dq + b_pd[:, None] * f_k + b_qd[:, None] * f_w).to(dq.dtype.element_ty), mask=m)
    _store_key_grads(dk, dw, beta, dbeta, p, m, row0, ri, m_ri, i_h, i_k, NTOT, b_dk + b_dkc + b_dko + b_pd[:, None] * f_q,
                     b_dwc + b_dwo + b_qd[:, None] * f_q, f_w, H, KEYED)
