"""Chunked Triton kernels for the separable decays: ones, scalar (g), vector_k (gk), vector_v (gv),
outer (gk + gv), each static ([H], [H,K], [H,V]) or per token.

One source, specialised by compile-time flags (USE_G/GK/GV, *_STATIC, HAS_H0, STORE_HT, IS_VARLEN).
Chunks of BT = 64 tokens; inside a chunk, decays along K or V use sub-chunks of BC = 16:

    forward   cumsum (per-token gates) -> state (h at every chunk start, sequential over chunks)
              -> scores A (only with gk or gv) -> output (inter: q·h, intra: A·v)
    backward  state again -> dstate (reverse over chunks) -> dA (only with gk or gv)
              -> dv -> dq, dk; the gate gradients follow from the identity
              d(cumulative log gate)_t = q ⊙ dq - k ⊙ dk (along K) or o ⊙ do - v ⊙ dv (along V),
              summed within each chunk together with the chunk's state term (chunk_gate_grad_kernel;
              with gk the tail of chunk_dqdk_gk_inter_kernel, after chunk_dqdk_gk_intra_kernel).

Numerics: every exponent is <= 0. Pairwise decays exp(L_t - L_s) inside a chunk are factored
against a reference row r with s <= r <= t, so both factors decay; the 16×16 diagonal blocks,
where no such row exists, are computed element by element. Rows past the end of a sequence take
the gate of its last token (the cumulative gate stays monotone). q, k, v below are s, e, i.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# LCSM_AUTOTUNE=0 compiles only the first (default) configuration of every kernel: for short jobs
# (tests, tiny models, many processes) where compiling a dozen variants costs more than it saves.
# The interpreter is slow, so it always takes one configuration: enough to test correctness.
TUNE = not INTERPRET and os.environ.get("LCSM_AUTOTUNE", "1") != "0"
BT, BC = 64, 16  # chunk and sub-chunk lengths
LOG_ZERO = tl.constexpr(-1000.0)  # lcsm.kernels.decay.LOG_ZERO: exp of it is exactly 0


def autotune(configs, key, reset_to_zero=None):
    # reset_to_zero: buffers the kernel accumulates into, zeroed before every trial while tuning
    # (a config with more K tiles would otherwise leave partial sums that the chosen one never overwrites)
    return triton.autotune(configs=configs if TUNE else configs[:1], key=key, reset_to_zero=reset_to_zero)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, length of the sequence, chunk index within it, global chunk id) of a chunk program."""
    if IS_VARLEN:
        i_n = tl.load(chunk_idx + i_t * 2).to(tl.int32)
        i_tl = tl.load(chunk_idx + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu + i_n).to(tl.int32)
        Tn = tl.load(cu + i_n + 1).to(tl.int32) - bos
        i_c = i_t
    else:
        i_tl = i_t
        bos = i_b * T
        Tn = T
        i_c = i_b * tl.cdiv(T, BT) + i_t
    return bos, Tn, i_tl, i_c


@triton.jit
def _seq_coords(i_n, T, cu, chunk_off, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, length, first global chunk id) of sequence i_n, for the sequential kernels."""
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int32)
        Tn = tl.load(cu + i_n + 1).to(tl.int32) - bos
        c0 = tl.load(chunk_off + i_n).to(tl.int32)
    else:
        bos = i_n * T
        Tn = T
        c0 = i_n * tl.cdiv(T, BT)
    return bos, Tn, c0


@triton.jit
def _gate(G, gs, row0, r, last, i_h, cols, m_cols, H: tl.constexpr, D: tl.constexpr, STATIC: tl.constexpr):
    """Chunk-local cumulative log gate at rows r (clamped to `last`): [R, C] fp32.

    Per token it is read from the cumsum buffer G [.., T, H, D]; static it is (r + 1)·g."""
    rr = tl.minimum(r, last)
    if STATIC:
        b = (rr + 1).to(tl.float32)[:, None] * tl.load(gs + i_h * D + cols, mask=m_cols, other=0.0)[None, :]
    else:
        b = tl.load(G + ((row0 + rr)[:, None] * H + i_h) * D + cols[None, :], mask=m_cols[None, :], other=0.0)
    return b


@triton.jit
def _gate_row(G, gs, row0, r, last, i_h, cols, m_cols, H: tl.constexpr, D: tl.constexpr, STATIC: tl.constexpr):
    """The same at one row r: [C]."""
    rr = tl.minimum(r, last)
    if STATIC:
        b = (rr + 1).to(tl.float32) * tl.load(gs + i_h * D + cols, mask=m_cols, other=0.0)
    else:
        b = tl.load(G + ((row0 + rr) * H + i_h) * D + cols, mask=m_cols, other=0.0)
    return b


@triton.jit
def _gate_scalar(G, gs, row0, r, last, i_h, H: tl.constexpr, STATIC: tl.constexpr):
    """Scalar gate per head at rows r (a vector or a single row)."""
    rr = tl.minimum(r, last)
    if STATIC:
        b = (rr + 1).to(tl.float32) * tl.load(gs + i_h)
    else:
        b = tl.load(G + (row0 + rr) * H + i_h)
    return b


@triton.jit
def _load_rows(X, row0, r, m_r, i_h, cols, m_cols, H: tl.constexpr, D: tl.constexpr):
    """X[row0 + r, i_h, cols] for X [.., T, H, D]: [R, C], zero outside."""
    return tl.load(X + ((row0 + r)[:, None] * H + i_h) * D + cols[None, :], mask=m_r[:, None] & m_cols[None, :], other=0.0)


@triton.jit
def _load_cols(X, row0, r, m_r, i_h, cols, m_cols, H: tl.constexpr, D: tl.constexpr):
    """The same tile transposed, [C, R]: loaded in the layout a product's left operand wants
    (kᵀ v in the state kernels), so that no transpose happens in registers."""
    return tl.load(X + ((row0 + r)[None, :] * H + i_h) * D + cols[:, None], mask=m_cols[:, None] & m_r[None, :], other=0.0)


@triton.jit
def _gate_t(G, gs, row0, r, last, i_h, cols, m_cols, H: tl.constexpr, D: tl.constexpr, STATIC: tl.constexpr):
    """_gate transposed: [C, R]."""
    rr = tl.minimum(r, last)
    if STATIC:
        b = tl.load(gs + i_h * D + cols, mask=m_cols, other=0.0)[:, None] * (rr + 1).to(tl.float32)[None, :]
    else:
        b = tl.load(G + ((row0 + rr)[None, :] * H + i_h) * D + cols[:, None], mask=m_cols[:, None], other=0.0)
    return b


# --------------------------------------------------------------------------- cumsum


@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(g, out, cu, chunk_idx, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Chunk-local inclusive cumsum of a per-token gate [.., T, H, D] (D = 1 for a scalar gate), fp32."""
    i_d, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    r = tl.arange(0, BT)
    m_r = i_tl * BT + r < Tn
    cols = i_d * BD + tl.arange(0, BD)
    m_c = cols < D
    row0 = bos + i_tl * BT
    b = _load_rows(g, row0, r, m_r, i_h, cols, m_c, H, D).to(tl.float32)
    b = tl.cumsum(tl.maximum(b, LOG_ZERO), axis=0)  # -inf (o = 0) floored: differences stay finite
    tl.store(out + ((row0 + r)[:, None] * H + i_h) * D + cols[None, :], b, mask=m_r[:, None] & m_c[None, :])


# --------------------------------------------------------------------------- state (forward)

# The state kernels run one program per (sequence, head, K tile, V tile), sequentially over the
# chunks. Tiles down to 32×16 and a tuning key on the number of (sequence, head) pairs were tried
# for the few-pairs case (2×8192 tokens at 8 heads: 16 pairs) and changed nothing on the H200
# (docs/benchmarks.md, 2026-12-01): the walk over the chunks bounds these kernels, not the tile.
STATE_CONFIGS = [
    triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BK": 64, "BV": 32}, num_warps=4, num_stages=3),
    triton.Config({"BK": 32, "BV": 64}, num_warps=2, num_stages=3),
    triton.Config({"BK": 32, "BV": 32}, num_warps=2, num_stages=3),
    triton.Config({"BK": 64, "BV": 64}, num_warps=8, num_stages=3),
    triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=4),
    # all of K = 128 in one tile: v (do) read once per chunk instead of once per K tile
    triton.Config({"BK": 128, "BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
]


@autotune(STATE_CONFIGS, key=["H", "K", "V", "USE_G", "USE_GK", "USE_GV"])
@triton.jit(do_not_specialize=["T"])
def chunk_state_fwd_kernel(
    k, v, g, gk, gv, gs, gks, gvs, h, h0, ht, cu, chunk_off, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """h[c] = the state before chunk c, for every chunk; sequential over the chunks of a sequence.

    h_{c+1} = D_c ⊙ h_c + Σ_s (k_s ⊙ exp(Gk_L - Gk_s)) (v_s ⊙ exp(Gv_L - Gv_s))ᵀ, L the chunk's last row."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn, c0 = _seq_coords(i_n, T, cu, chunk_off, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
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
        b_k = _load_cols(k, row0, r, m_r, i_h, o_k, m_k, H, K)  # [BK, BT]
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        if USE_GK:
            b_g = _gate_t(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_h *= tl.exp(b_gl)[:, None]
            b_k = (b_k * tl.exp(b_gl[:, None] - b_g)).to(b_k.dtype)
        if USE_GV:
            b_g = _gate(gv, gvs, row0, r, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_gl = _gate_row(gv, gvs, row0, last, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_h *= tl.exp(b_gl)[None, :]
            b_v = (b_v * tl.exp(b_gl[None, :] - b_g)).to(b_v.dtype)
        if USE_G:
            b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
            b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
            b_h *= tl.exp(b_gl)
            b_v = (b_v * tl.exp(b_gl - b_g)[:, None]).to(b_v.dtype)
        b_h = tl.dot(b_k, b_v, b_h)
    if STORE_HT:
        tl.store(ht + (i_nh * K + o_k[:, None]) * V + o_v[None, :], b_h, mask=m_kv)


# --------------------------------------------------------------------------- scores


@autotune([triton.Config({"BD": 64}, num_warps=4), triton.Config({"BD": 32}, num_warps=4)], key=["H", "D", "USE_G"])
@triton.jit(do_not_specialize=["T"])
def chunk_scores_kernel(
    a, b, g, gs, S, cu, chunk_idx, T,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """S[t, s] = (a_t · b_s) exp(G_t - G_s) for s <= t in a chunk, 0 above; S [.., T, H, BT] fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    b_S = tl.zeros([BT, BT], dtype=tl.float32)
    for i_d in range(tl.cdiv(D, BD)):
        cols = i_d * BD + tl.arange(0, BD)
        m_c = cols < D
        b_a = _load_rows(a, row0, r, m_r, i_h, cols, m_c, H, D)
        b_b = _load_rows(b, row0, r, m_r, i_h, cols, m_c, H, D)
        b_S += tl.dot(b_a, tl.trans(b_b))
    causal = r[:, None] >= r[None, :]
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_S = b_S * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.0))
    b_S = tl.where(causal, b_S, 0.0)
    tl.store(S + ((row0 + r)[:, None] * H + i_h) * BT + r[None, :], b_S, mask=m_r[:, None])


@autotune([triton.Config({}, num_warps=4), triton.Config({}, num_warps=2), triton.Config({}, num_warps=8)], key=["H", "D"])
@triton.jit(do_not_specialize=["T"])
def chunk_scores_decay_kernel(
    a, b, L, Ls, S, cu, chunk_idx, T,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDF: tl.constexpr,
    L_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """S[t, s] = Σ_d a_td b_sd exp(L_td - L_sd) for s <= t, with a decay L along D (gk or gv).

    One program per sub-chunk i of rows (all BDF >= D features at once): each earlier sub-chunk j
    through a product factored at the reference row 16i, the diagonal block element by element."""
    i_i, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r0 = i_i * BC
    if r0 > last:
        return
    ri = r0 + tl.arange(0, BC)  # rows of this sub-chunk
    m_ri = ri <= last
    rs = tl.arange(0, BT)
    cols = tl.arange(0, BDF)
    m_c = cols < D
    b_a = _load_rows(a, row0, ri, m_ri, i_h, cols, m_c, H, D)
    b_la = _gate(L, Ls, row0, ri, last, i_h, cols, m_c, H, D, L_STATIC)
    # earlier sub-chunks: exp(L_t - L_s) = exp(L_t - L_ref) · exp(L_ref - L_s), both exponents <= 0
    b_ref = _gate_row(L, Ls, row0, r0, last, i_h, cols, m_c, H, D, L_STATIC)
    b_as = (b_a * tl.exp(b_la - b_ref[None, :])).to(b_a.dtype)
    for j in range(0, i_i):
        rj = j * BC + tl.arange(0, BC)  # rows before r0 <= last: all inside the sequence
        b_b = _load_rows(b, row0, rj, rj <= last, i_h, cols, m_c, H, D)
        b_lb = _gate(L, Ls, row0, rj, last, i_h, cols, m_c, H, D, L_STATIC)
        b_b = (b_b * tl.exp(b_ref[None, :] - b_lb)).to(b_b.dtype)
        b_S = tl.dot(b_as, tl.trans(b_b))
        tl.store(S + ((row0 + ri)[:, None] * H + i_h) * BT + rj[None, :], b_S, mask=m_ri[:, None])
    # above the diagonal block: zeros, so that readers may load whole rows
    p_S = S + ((row0 + ri)[:, None] * H + i_h) * BT + rs[None, :]
    tl.store(p_S, tl.zeros([BC, BT], dtype=tl.float32), mask=m_ri[:, None] & (rs >= r0 + BC)[None, :])
    # the diagonal block, one column at a time
    b_a = b_a.to(tl.float32)
    for j in range(0, tl.minimum(BC, last - r0 + 1)):
        s = r0 + j
        b_bj = tl.load(b + ((row0 + s) * H + i_h) * D + cols, mask=m_c, other=0.0).to(tl.float32)
        b_lj = _gate_row(L, Ls, row0, s, last, i_h, cols, m_c, H, D, L_STATIC)
        # rows above s get a positive exponent, maybe inf (and inf·0 = nan): the where drops those
        # whole rows, so the exponent itself is not masked (one select less per element)
        col = tl.sum(b_a * b_bj[None, :] * tl.exp(b_la - b_lj[None, :]), axis=1)
        col = tl.where(ri >= s, col, 0.0)
        tl.store(S + ((row0 + ri) * H + i_h) * BT + s, col, mask=m_ri)


# --------------------------------------------------------------------------- output


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2),
     triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=3),
     triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 32}, num_warps=2, num_stages=3)],
    key=["H", "K", "V", "USE_G", "USE_GK"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_output_kernel(
    q, k, v, h, g, gk, gs, gks, A, o, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_A: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """o = (q ⊙ exp(Gk)) h_c + A v for a whole chunk (no decay along V).

    A is read from the scores buffer when there is a decay along K (USE_A), else it is
    (q kᵀ) ⊙ exp(G_t - G_s), computed here."""
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
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
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
        if not USE_A:
            b_kk = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)
            b_A += tl.dot(b_q, tl.trans(b_kk))
    causal = r[:, None] >= r[None, :]
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_o *= tl.exp(b_g)[:, None]
        if not USE_A:
            b_A *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], 0.0))
    if USE_A:
        b_A = tl.load(A + ((row0 + r)[:, None] * H + i_h) * BT + r[None, :], mask=m_r[:, None], other=0.0)
    b_A = tl.where(causal, b_A, 0.0)
    b_vv = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
    b_o += tl.dot(b_A.to(b_vv.dtype), b_vv)
    tl.store(o + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])


@triton.jit
def _intra_forward(W, X, L, Ls, row0, r0, last, i_h, cols, m_c, H: tl.constexpr, D: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, L_STATIC: tl.constexpr, STRICT: tl.constexpr):
    """out_t = Σ_{s<=t} W_ts x_s ⊙ exp(L_t - L_s) for the rows t of the sub-chunk starting at r0
    (s < t with STRICT). W [.., T, H, BT] is a scores buffer, x [.., T, H, D], L a decay along D:
    returns [BC, BD] fp32."""
    ri = r0 + tl.arange(0, BC)
    m_ri = ri <= last
    rs = tl.arange(0, BT)
    m_rs = rs <= last
    b_li = _gate(L, Ls, row0, ri, last, i_h, cols, m_c, H, D, L_STATIC)
    b_ref = _gate_row(L, Ls, row0, r0, last, i_h, cols, m_c, H, D, L_STATIC)
    # earlier sub-chunks, factored at the reference row r0: both exponents <= 0
    b_W = tl.load(W + ((row0 + ri)[:, None] * H + i_h) * BT + rs[None, :], mask=m_ri[:, None] & (rs < r0)[None, :], other=0.0)
    b_x = _load_rows(X, row0, rs, m_rs, i_h, cols, m_c, H, D)
    b_ls = _gate(L, Ls, row0, rs, last, i_h, cols, m_c, H, D, L_STATIC)
    b_x = (b_x * tl.exp(tl.where((rs < r0)[:, None], b_ref[None, :] - b_ls, float("-inf")))).to(b_x.dtype)
    b_out = tl.dot(b_W.to(b_x.dtype), b_x) * tl.exp(b_li - b_ref[None, :])
    # the diagonal block, one source row at a time
    for j in range(0, tl.minimum(BC, last - r0 + 1)):
        s = r0 + j
        b_w = tl.load(W + ((row0 + ri) * H + i_h) * BT + s, mask=m_ri, other=0.0)
        b_xs = tl.load(X + ((row0 + s) * H + i_h) * D + cols, mask=m_c, other=0.0).to(tl.float32)
        b_lj = _gate_row(L, Ls, row0, s, last, i_h, cols, m_c, H, D, L_STATIC)
        if STRICT:
            keep = (ri > s)[:, None]
        else:
            keep = (ri >= s)[:, None]
        b_out += tl.where(keep, b_w[:, None] * b_xs[None, :] * tl.exp(tl.where(keep, b_li - b_lj[None, :], 0.0)), 0.0)
    return b_out


@triton.jit
def _intra_backward(W, X, L, Ls, row0, r0, last, i_h, cols, m_c, H: tl.constexpr, D: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, L_STATIC: tl.constexpr, STRICT: tl.constexpr):
    """out_s = Σ_{t>=s} W_ts x_t ⊙ exp(L_t - L_s) (t > s with STRICT) for the rows s of the
    sub-chunk starting at r0: [BC, BD] fp32."""
    rj = r0 + tl.arange(0, BC)
    m_rj = rj <= last
    rt = tl.arange(0, BT)
    m_rt = rt <= last
    r_end = tl.minimum(r0 + BC - 1, last)  # reference: the sub-chunk's last row
    b_lj = _gate(L, Ls, row0, rj, last, i_h, cols, m_c, H, D, L_STATIC)
    b_ref = _gate_row(L, Ls, row0, r_end, last, i_h, cols, m_c, H, D, L_STATIC)
    later = rt > r_end
    b_W = tl.load(W + ((row0 + rt)[:, None] * H + i_h) * BT + rj[None, :], mask=(later & m_rt)[:, None] & m_rj[None, :], other=0.0)
    b_x = _load_rows(X, row0, rt, m_rt, i_h, cols, m_c, H, D)
    b_lt = _gate(L, Ls, row0, rt, last, i_h, cols, m_c, H, D, L_STATIC)
    b_x = (b_x * tl.exp(tl.where(later[:, None], b_lt - b_ref[None, :], float("-inf")))).to(b_x.dtype)
    b_out = tl.dot(tl.trans(b_W).to(b_x.dtype), b_x) * tl.exp(b_ref[None, :] - b_lj)
    for j in range(0, tl.minimum(BC, last - r0 + 1)):
        t = r0 + j
        b_w = tl.load(W + ((row0 + t) * H + i_h) * BT + rj, mask=m_rj, other=0.0)
        b_xt = tl.load(X + ((row0 + t) * H + i_h) * D + cols, mask=m_c, other=0.0).to(tl.float32)
        b_lt1 = _gate_row(L, Ls, row0, t, last, i_h, cols, m_c, H, D, L_STATIC)
        if STRICT:
            keep = (rj < t)[:, None]
        else:
            keep = (rj <= t)[:, None]
        b_out += tl.where(keep, b_w[:, None] * b_xt[None, :] * tl.exp(tl.where(keep, b_lt1[None, :] - b_lj, 0.0)), 0.0)
    return b_out


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4), triton.Config({"BK": 32, "BV": 32}, num_warps=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8), triton.Config({"BK": 32, "BV": 64}, num_warps=4),
     triton.Config({"BK": 64, "BV": 32}, num_warps=4)],
    key=["H", "K", "V", "USE_G", "USE_GK"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_output_gv_kernel(
    q, k, v, h, g, gk, gv, gs, gks, gvs, A, o, o_strict, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    GV_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """With a decay along V: o_t = ((q_t ⊙ exp(Gk_t)) h_c) ⊙ exp(Gv_t) + Σ_s A_ts v_s ⊙ exp(Gv_t - Gv_s),
    one program per sub-chunk of rows. Also stores o without its s = t term (fp32), which the
    gradient of Gv needs free of that large, gate-independent term."""
    i_v, i_tc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BC, BV], dtype=tl.float32)
    b_qk = tl.zeros([BC], dtype=tl.float32)  # q_t · k_t, the diagonal score
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = _load_rows(q, row0, ri, m_ri, i_h, o_k, m_k, H, K)
        b_qk += tl.sum(b_q.to(tl.float32) * _load_rows(k, row0, ri, m_ri, i_h, o_k, m_k, H, K).to(tl.float32), axis=1)
        if USE_GK:
            b_q = (b_q * tl.exp(_gate(gk, gks, row0, ri, last, i_h, o_k, m_k, H, K, GK_STATIC))).to(b_q.dtype)
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h.to(b_q.dtype))
    if USE_G:
        b_o *= tl.exp(_gate_scalar(g, gs, row0, ri, last, i_h, H, G_STATIC))[:, None]
    b_o *= tl.exp(_gate(gv, gvs, row0, ri, last, i_h, o_v, m_v, H, V, GV_STATIC))
    b_o += _intra_forward(A, v, gv, gvs, row0, r0, last, i_h, o_v, m_v, H, V, BT, BC, GV_STATIC, True)
    p = ((row0 + ri)[:, None] * H + i_h) * V + o_v[None, :]
    m = m_ri[:, None] & m_v[None, :]
    tl.store(o_strict + p, b_o, mask=m)
    b_v = _load_rows(v, row0, ri, m_ri, i_h, o_v, m_v, H, V).to(tl.float32)
    tl.store(o + p, (b_o + b_qk[:, None] * b_v).to(o.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- backward


@autotune(STATE_CONFIGS, key=["H", "K", "V", "USE_G", "USE_GK", "USE_GV"])
@triton.jit(do_not_specialize=["T"])
def chunk_state_bwd_kernel(
    q, do, g, gk, gv, gs, gks, gvs, dh, dht, dh0, cu, chunk_off, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dh[c] = ∂L/∂(state after chunk c), sequential from the last chunk back:
    ∂L/∂h_c = (q ⊙ exp(Gk))ᵀ (do ⊙ exp(Gv)) + D_c ⊙ ∂L/∂h_{c+1}; dh0 = ∂L/∂h_0."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, Tn, c0 = _seq_coords(i_n, T, cu, chunk_off, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
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
        b_q = _load_cols(q, row0, r, m_r, i_h, o_k, m_k, H, K)  # [BK, BT]
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        if USE_GK:
            b_g = _gate_t(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_dh *= tl.exp(_gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC))[:, None]
            b_q = (b_q * tl.exp(b_g)).to(b_q.dtype)
        if USE_GV:
            b_g = _gate(gv, gvs, row0, r, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_dh *= tl.exp(_gate_row(gv, gvs, row0, last, last, i_h, o_v, m_v, H, V, GV_STATIC))[None, :]
            b_do = (b_do * tl.exp(b_g)).to(b_do.dtype)
        if USE_G:
            b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
            b_dh *= tl.exp(_gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC))
            b_do = (b_do * tl.exp(b_g)[:, None]).to(b_do.dtype)
        b_dh = tl.dot(b_q, b_do, b_dh)
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
def chunk_dv_kernel(
    q, k, do, dh, g, gk, gs, gks, A, dv, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_A: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv_s = ((k_s ⊙ exp(Gk_L - Gk_s)) dh_c) exp(G_L - G_s) + Σ_{t>=s} A_ts do_t (no decay along V)."""
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
    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [s, t]
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
        if not USE_A:
            b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)
            b_At += tl.dot(b_k, tl.trans(b_q))
    anticausal = r[:, None] <= r[None, :]
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
        b_dv *= tl.exp(b_gl - b_g)[:, None]
        if not USE_A:
            b_At *= tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], 0.0))
    if USE_A:
        b_At = tl.load(A + ((row0 + r[None, :]) * H + i_h) * BT + r[:, None], mask=m_r[None, :], other=0.0)
    b_At = tl.where(anticausal, b_At, 0.0)
    b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do)
    tl.store(dv + ((row0 + r)[:, None] * H + i_h) * V + o_v[None, :], b_dv, mask=m_r[:, None] & m_v[None, :])


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4), triton.Config({"BK": 32, "BV": 32}, num_warps=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8), triton.Config({"BK": 32, "BV": 64}, num_warps=4),
     triton.Config({"BK": 64, "BV": 32}, num_warps=4)],
    key=["H", "K", "V", "USE_G", "USE_GK"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_dv_gv_kernel(
    q, k, v, do, o_strict, h, dh, g, gk, gv, gs, gks, gvs, A, dv, dga, dgb, dgc, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    GV_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dv with a decay along V, one program per sub-chunk of rows:
    dv_s = ((k̃_s dh_c) exp(G_L - G_s)) ⊙ exp(Gv_L - Gv_s) + Σ_{t>=s} A_ts do_t ⊙ exp(Gv_t - Gv_s).
    Also the parts of the gate gradient (see chunk_gate_grad_kernel): dga = do ⊙ o - v ⊙ dv_intra,
    from the parts of o and dv without their s = t terms (those cancel exactly and would only leave
    rounding), dgb = v ⊙ dv_inter and dgc = Σ_k D_c h_c ⊙ dh_c."""
    i_v, i_tc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r0 = i_i * BC
    if r0 > last:
        return
    rj = r0 + tl.arange(0, BC)
    m_rj = rj <= last
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    b_qk = tl.zeros([BC], dtype=tl.float32)
    b_hdh = tl.zeros([BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = _load_rows(k, row0, rj, m_rj, i_h, o_k, m_k, H, K)
        b_qk += tl.sum(b_k.to(tl.float32) * _load_rows(q, row0, rj, m_rj, i_h, o_k, m_k, H, K).to(tl.float32), axis=1)
        if USE_GK:
            b_g = _gate(gk, gks, row0, rj, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
            b_k = (b_k * tl.exp(b_gl[None, :] - b_g)).to(b_k.dtype)
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype))
        if i_i == 0:  # one sub-chunk computes the chunk's state term
            b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_hd = b_h.to(tl.float32) * b_dh.to(tl.float32)
            if USE_GK:
                b_hd *= tl.exp(b_gl)[:, None]
            b_hdh += tl.sum(b_hd, axis=0)
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, rj, last, i_h, H, G_STATIC)
        b_g_last = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
        b_dv *= tl.exp(b_g_last - b_g)[:, None]
        b_hdh *= tl.exp(b_g_last)
    b_gvl = _gate_row(gv, gvs, row0, last, last, i_h, o_v, m_v, H, V, GV_STATIC)
    b_dv_inter = b_dv * tl.exp(b_gvl[None, :] - _gate(gv, gvs, row0, rj, last, i_h, o_v, m_v, H, V, GV_STATIC))
    b_dv = _intra_backward(A, do, gv, gvs, row0, r0, last, i_h, o_v, m_v, H, V, BT, BC, GV_STATIC, True)
    p = ((row0 + rj)[:, None] * H + i_h) * V + o_v[None, :]
    m = m_rj[:, None] & m_v[None, :]
    b_do = _load_rows(do, row0, rj, m_rj, i_h, o_v, m_v, H, V).to(tl.float32)
    b_v = _load_rows(v, row0, rj, m_rj, i_h, o_v, m_v, H, V).to(tl.float32)
    b_os = tl.load(o_strict + p, mask=m, other=0.0)
    tl.store(dga + p, b_do * b_os - b_v * b_dv, mask=m)
    tl.store(dgb + p, b_v * b_dv_inter, mask=m)
    if i_i == 0:
        tl.store(dgc + (i_c * H + i_h) * V + o_v, b_hdh * tl.exp(b_gvl), mask=m_v)
    tl.store(dv + p, (b_dv + b_dv_inter + b_qk[:, None] * b_do).to(dv.dtype.element_ty), mask=m)


@autotune(
    [triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 128, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 32}, num_warps=4, num_stages=3)],
    key=["H", "K", "V", "USE_G", "USE_GV"],
    reset_to_zero=["dga", "dgb", "dgc"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_dqdk_kernel(
    q, k, v, do, h, dh, g, gv, gs, gvs, dA, dq, dk, dga, dgb, dgc, cu, chunk_idx, T, NTOT, NC,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GV: tl.constexpr, GV_STATIC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dq, dk without a decay along K: the inter-chunk terms plus dA' = dA ⊙ exp(G_t - G_s),
    dq += dA' k, dk += dA'ᵀ q; dA = do vᵀ here, or read from the scores buffer (USE_GV).
    With a scalar decay, this K tile's parts of the gate gradient (see chunk_gate_grad_kernel):
    dga = Σ q ⊙ dq - k ⊙ dk_intra over the s != t terms, dgb = Σ k ⊙ dk_inter, dgc = Σ D_c h_c ⊙ dh_c."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dov = tl.zeros([BT], dtype=tl.float32)  # do_t · v_t, the diagonal of dA
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # Σ_v (D_c h_c ⊙ dh_c), the scalar decay's state term
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None], other=0.0)
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None], other=0.0)
        if USE_GV:
            b_dov += tl.sum(b_do.to(tl.float32) * b_v.to(tl.float32), axis=1)
            b_g = _gate(gv, gvs, row0, r, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_gl = _gate_row(gv, gvs, row0, last, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_dq += tl.dot((b_do * tl.exp(b_g)).to(b_do.dtype), b_h.to(b_do.dtype))
            b_dk += tl.dot((b_v * tl.exp(b_gl[None, :] - b_g)).to(b_v.dtype), b_dh.to(b_v.dtype))
            if USE_G:
                b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32) * tl.exp(b_gl)[:, None], axis=0)
        else:
            b_dq += tl.dot(b_do, b_h.to(b_do.dtype))
            b_dk += tl.dot(b_v, b_dh.to(b_v.dtype))
            b_dA += tl.dot(b_do, tl.trans(b_v))
            if USE_G:
                b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
    if USE_GV:
        b_dA = tl.load(dA + ((row0 + r)[:, None] * H + i_h) * BT + r[None, :], mask=m_r[:, None], other=0.0)
    b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K)
    b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K)
    p = ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :]
    m = m_r[:, None] & m_k[None, :]
    if USE_G:
        b_g = _gate_scalar(g, gs, row0, r, last, i_h, H, G_STATIC)
        b_gl = _gate_scalar(g, gs, row0, last, last, i_h, H, G_STATIC)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk_inter = b_dk * tl.exp(b_gl - b_g)[:, None]
        strict = r[:, None] > r[None, :]
        if not USE_GV:
            b_dov = tl.sum(tl.where(r[:, None] == r[None, :], b_dA, 0.0), axis=1)
        b_dA = tl.where(strict, b_dA * tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], 0.0)), 0.0)
        b_dq += tl.dot(b_dA.to(b_k.dtype), b_k)
        b_dk = tl.dot(tl.trans(b_dA).to(b_q.dtype), b_q)
        b_ga = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, axis=1)
        b_gb = tl.sum(b_k.to(tl.float32) * b_dk_inter, axis=1)
        tl.store(dga + (i_k * NTOT + row0 + r) * H + i_h, b_ga, mask=m_r)
        tl.store(dgb + (i_k * NTOT + row0 + r) * H + i_h, b_gb, mask=m_r)
        tl.store(dgc + (i_k * NC + i_c) * H + i_h, tl.sum(b_hdh) * tl.exp(b_gl))
        tl.store(dq + p, (b_dq + b_dov[:, None] * b_k.to(tl.float32)).to(dq.dtype.element_ty), mask=m)
        tl.store(dk + p, (b_dk + b_dk_inter + b_dov[:, None] * b_q.to(tl.float32)).to(dk.dtype.element_ty), mask=m)
    else:
        b_dA = tl.where(r[:, None] >= r[None, :], b_dA, 0.0)
        b_dq += tl.dot(b_dA.to(b_k.dtype), b_k)
        b_dk += tl.dot(tl.trans(b_dA).to(b_q.dtype), b_q)
        tl.store(dq + p, b_dq.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)


# dq, dk with a decay along K in two kernels (autograd.dqdk_gk), as fla-core's chunk_gla splits
# them: the intra-chunk terms in 16-row sub-chunks with their own small tiles, then the
# inter-chunk matmuls over whole 64-row chunks, which also finish dq, dk and assemble the gate
# gradient. On the H200 the pair takes 0.75x the time of the single kernel (inter and intra in one
# program per sub-chunk) that it replaced (docs/benchmarks.md, 2026-12-01).
# The intra kernel runs first so that the kernel holding all 64 rows of a chunk can do the gate
# gradient's cumsums in its tail: no dga/dgb/dgc buffers and no chunk_gate_grad_kernel launch.


@autotune(
    [triton.Config({"BK": 64}, num_warps=4),
     triton.Config({"BK": 64}, num_warps=2),
     triton.Config({"BK": 32}, num_warps=2),
     triton.Config({"BK": 32}, num_warps=1),
     triton.Config({"BK": 32}, num_warps=4)],
    key=["H", "K"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_dqdk_gk_intra_kernel(
    q, k, gk, gks, dA, dq_intra, dk_intra, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    GK_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The intra-chunk parts of dq, dk with a decay along K, strictly off the diagonal:

        dq_intra_t = Σ_{s<t} dA_ts k_s ⊙ exp(Gk_t - Gk_s)     dk_intra_s = Σ_{t>s} dA_ts q_t ⊙ exp(Gk_t - Gk_s)

    q, k [.., T, H, K], dA [.., T, H, BT] fp32 (the score gradient, zero above the diagonal);
    dq_intra, dk_intra [.., T, H, K] fp32, rows past a sequence's end left unwritten. One program
    per (K tile, 16-row sub-chunk i of a chunk, batch·head): earlier (later) sub-chunks j through a
    [BC, BC] × [BC, BK] product factored at a reference row of sub-chunk i, so both exponents are
    <= 0; the diagonal block element by element. The s = t terms are chunk_dqdk_gk_inter_kernel's."""
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
    b_gi = _gate(gk, gks, row0, ri, last, i_h, o_k, m_k, H, K, GK_STATIC)

    # dq from the earlier sub-chunks (none for i = 0), reference row r0: exp(L_t - L_r0)·exp(L_r0 - L_s)
    b_ref = _gate_row(gk, gks, row0, r0, last, i_h, o_k, m_k, H, K, GK_STATIC)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(0, i_i):
        rj = j * BC + tl.arange(0, BC)  # rows before r0 <= last: all inside the sequence
        b_kj = _load_rows(k, row0, rj, rj <= last, i_h, o_k, m_k, H, K)
        b_gj = _gate(gk, gks, row0, rj, last, i_h, o_k, m_k, H, K, GK_STATIC)
        b_kj = (b_kj * tl.exp(b_ref[None, :] - b_gj)).to(b_kj.dtype)
        b_W = tl.load(dA + ((row0 + ri)[:, None] * H + i_h) * BT + rj[None, :], mask=m_ri[:, None], other=0.0)
        b_dq += tl.dot(b_W.to(b_kj.dtype), b_kj)
    b_dq *= tl.exp(b_gi - b_ref[None, :])
    # the diagonal block, one source row s at a time, in fp32
    n_diag = tl.minimum(BC, last - r0 + 1)
    for j in range(0, n_diag):
        s = r0 + j
        b_w = tl.load(dA + ((row0 + ri) * H + i_h) * BT + s, mask=m_ri, other=0.0)
        b_ks = tl.load(k + ((row0 + s) * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_gs = _gate_row(gk, gks, row0, s, last, i_h, o_k, m_k, H, K, GK_STATIC)
        keep = (ri > s)[:, None]
        b_dq += tl.where(keep, b_w[:, None] * b_ks[None, :] * tl.exp(tl.where(keep, b_gi - b_gs[None, :], 0.0)), 0.0)

    # dk from the later sub-chunks, reference row: this sub-chunk's last row inside the sequence
    r_end = tl.minimum(r0 + BC - 1, last)
    b_ref = _gate_row(gk, gks, row0, r_end, last, i_h, o_k, m_k, H, K, GK_STATIC)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(i_i + 1, tl.cdiv(last + 1, BC)):
        rt = j * BC + tl.arange(0, BC)
        m_rt = rt <= last
        b_qt = _load_rows(q, row0, rt, m_rt, i_h, o_k, m_k, H, K)
        b_gt = _gate(gk, gks, row0, rt, last, i_h, o_k, m_k, H, K, GK_STATIC)
        b_qt = (b_qt * tl.exp(b_gt - b_ref[None, :])).to(b_qt.dtype)
        # dAᵀ [s, t]: contiguous along s
        b_Wt = tl.load(dA + ((row0 + rt)[None, :] * H + i_h) * BT + ri[:, None], mask=m_ri[:, None] & m_rt[None, :], other=0.0)
        b_dk += tl.dot(b_Wt.to(b_qt.dtype), b_qt)
    b_dk *= tl.exp(b_ref[None, :] - b_gi)
    for j in range(0, n_diag):
        t = r0 + j
        b_w = tl.load(dA + ((row0 + t) * H + i_h) * BT + ri, mask=m_ri, other=0.0)
        b_qt1 = tl.load(q + ((row0 + t) * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_gt1 = _gate_row(gk, gks, row0, t, last, i_h, o_k, m_k, H, K, GK_STATIC)
        keep = (ri < t)[:, None]
        b_dk += tl.where(keep, b_w[:, None] * b_qt1[None, :] * tl.exp(tl.where(keep, b_gt1[None, :] - b_gi, 0.0)), 0.0)

    p = ((row0 + ri)[:, None] * H + i_h) * K + o_k[None, :]
    m = m_ri[:, None] & m_k[None, :]
    tl.store(dq_intra + p, b_dq, mask=m)
    tl.store(dk_intra + p, b_dk, mask=m)


@autotune(
    # 8 warps first: compiled for sm_90 (Triton 3.9, ptxas), 64×64 tiles take 146-249 registers
    # and no spills with 8 warps, 255 and a few spilled with 4 (the tail holds several fp32 tiles)
    [triton.Config({"BK": 64, "BV": 64}, num_warps=8, num_stages=2),
     triton.Config({"BK": 64, "BV": 64}, num_warps=8, num_stages=3),
     triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
     triton.Config({"BK": 32, "BV": 64}, num_warps=4, num_stages=3),
     triton.Config({"BK": 64, "BV": 128}, num_warps=8, num_stages=2)],
    key=["H", "K", "V", "USE_GV"],
)
@triton.jit(do_not_specialize=["T"])
def chunk_dqdk_gk_inter_kernel(
    q, k, v, do, h, dh, gk, gv, gks, gvs, dq_intra, dk_intra, dq, dk, dg, cu, chunk_idx, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GK_STATIC: tl.constexpr, USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq, dk with a decay along K, finished over whole chunks, and the gradient of Gk:

        dq_t = (do_t ⊙ exp(Gv_t)) h_cᵀ ⊙ exp(Gk_t) + dq_intra_t + (do_t · v_t) k_t
        dk_s = (v_s ⊙ exp(Gv_L - Gv_s)) dh_cᵀ ⊙ exp(Gk_L - Gk_s) + dk_intra_s + (do_s · v_s) q_s

    (L the chunk's last row; do · v is the diagonal of dA, whose decay is 1). One program per
    (K tile, chunk, batch·head), a plain [BT, BV] × [BV, BK] matmul loop over the V tiles.
    q, k, dq, dk [.., T, H, K]; v, do [.., T, H, V]; h, dh [n_chunks, H, K, V]; dq_intra, dk_intra
    [.., T, H, K] fp32 from chunk_dqdk_gk_intra_kernel; dg [.., T, H, K] fp32 is the gradient of
    the per-token log gate, assembled as chunk_gate_grad_kernel does, with the chunk in registers:
    dg_t = Σ_{t'>=t} a_t' + Σ_{s<t} b_s + c with a = q ⊙ dq - k ⊙ dk_intra without the s = t terms
    (they cancel exactly), b = k ⊙ dk_inter and c = Σ_v D_c h_c ⊙ dh_c."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    row0 = bos + i_tl * BT
    last = tl.minimum(BT, Tn - i_tl * BT) - 1
    r = tl.arange(0, BT)
    m_r = r <= last
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dov = tl.zeros([BT], dtype=tl.float32)  # do_t · v_t
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # Σ_v (exp(Gv_L) ⊙ h_c ⊙ dh_c)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = _load_rows(do, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_v = _load_rows(v, row0, r, m_r, i_h, o_v, m_v, H, V)
        b_dov += tl.sum(b_do.to(tl.float32) * b_v.to(tl.float32), axis=1)
        # hᵀ, dhᵀ tiles [BV, BK]
        b_h = tl.load(h + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None], other=0.0)
        b_dh = tl.load(dh + ((i_c * H + i_h) * K + o_k[None, :]) * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None], other=0.0)
        b_hd = b_h.to(tl.float32) * b_dh.to(tl.float32)
        if USE_GV:
            b_g = _gate(gv, gvs, row0, r, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_gl = _gate_row(gv, gvs, row0, last, last, i_h, o_v, m_v, H, V, GV_STATIC)
            b_do = (b_do * tl.exp(b_g)).to(b_do.dtype)
            b_v = (b_v * tl.exp(b_gl[None, :] - b_g)).to(b_v.dtype)
            b_hd *= tl.exp(b_gl)[:, None]
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype))
        b_dk += tl.dot(b_v, b_dh.to(b_v.dtype))
        b_hdh += tl.sum(b_hd, axis=0)
    b_g = _gate(gk, gks, row0, r, last, i_h, o_k, m_k, H, K, GK_STATIC)
    b_gl = _gate_row(gk, gks, row0, last, last, i_h, o_k, m_k, H, K, GK_STATIC)
    p = ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :]
    m = m_r[:, None] & m_k[None, :]
    # in an order that lets each [BT, BK] fp32 tile die early: eight live at once would spill
    b_dq = b_dq * tl.exp(b_g) + tl.load(dq_intra + p, mask=m, other=0.0)
    b_dk_inter = b_dk * tl.exp(b_gl[None, :] - b_g)
    b_k = _load_rows(k, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
    b_q = _load_rows(q, row0, r, m_r, i_h, o_k, m_k, H, K).to(tl.float32)
    # the gate gradient's parts a (without the s = t terms) and b; rows past the end are zero in
    # both, so the cumsums below ignore them
    b_a = b_q * b_dq
    b_b = b_k * b_dk_inter
    tl.store(dq + p, (b_dq + b_dov[:, None] * b_k).to(dq.dtype.element_ty), mask=m)
    b_dk = tl.load(dk_intra + p, mask=m, other=0.0)
    b_a -= b_k * b_dk
    tl.store(dk + p, (b_dk + b_dk_inter + b_dov[:, None] * b_q).to(dk.dtype.element_ty), mask=m)
    # Σ_{t'>=t} a_t' + Σ_{s<t} b_s through one inclusive cumsum, of b - a (a second, reverse one
    # spills registers at 64×64 tiles): (Σ a - Σ_{t'<=t} a_t') + a_t + (Σ_{s<=t} b_s) - b_t
    b_dg = tl.cumsum(b_b - b_a, axis=0) + (b_a - b_b) + (tl.sum(b_a, axis=0) + b_hdh * tl.exp(b_gl))[None, :]
    tl.store(dg + p, b_dg, mask=m)


@triton.jit(do_not_specialize=["T"])
def chunk_gate_grad_kernel(a, b, c, out, cu, chunk_idx, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                           BD: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The gradient of a per-token log gate, assembled within its chunk from three parts:

        dg_t = Σ_{t' >= t} a_t' + Σ_{s < t} b_s + c
        a = q ⊙ dq - k ⊙ dk_intra   (the chunk's outputs; along V: do ⊙ o - v ⊙ dv_intra)
        b = k ⊙ dk_inter            (each token's write into the state after the chunk)
        c = Σ D_c h_c ⊙ dh_c        (the state before the chunk, carried through its decay D_c)

    a, b, out [.., T, H, D], c [n_chunks, H, D], fp32. No sum runs along the whole sequence: what
    lies beyond the chunk enters through dh_c alone, so rounding in the terms does not pile up over T."""
    i_d, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, Tn, i_tl, i_c = _chunk_coords(i_t, i_b, T, cu, chunk_idx, BT, IS_VARLEN)
    r = tl.arange(0, BT)
    m_r = i_tl * BT + r < Tn
    cols = i_d * BD + tl.arange(0, BD)
    m_c = cols < D
    row0 = bos + i_tl * BT
    b_a = _load_rows(a, row0, r, m_r, i_h, cols, m_c, H, D)
    b_b = _load_rows(b, row0, r - 1, m_r & (r >= 1), i_h, cols, m_c, H, D)  # b_{t-1}: an exclusive cumsum
    b_c = tl.load(c + (i_c * H + i_h) * D + cols, mask=m_c, other=0.0)
    b_g = tl.cumsum(b_a, axis=0, reverse=True) + tl.cumsum(b_b, axis=0) + b_c[None, :]
    tl.store(out + ((row0 + r)[:, None] * H + i_h) * D + cols[None, :], b_g, mask=m_r[:, None] & m_c[None, :])
