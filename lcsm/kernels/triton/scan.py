"""Scan kernels for any decay, `full` included: log o_t = dt_t ⊗ A, a static A, a per-token A, plus
any separable g / gk / gv (raw per-step log gates).

The recurrence m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ is element-wise in (k, v): each program holds a
[K-tile, V-tile] of the state and runs blocks of BS tokens as a parallel associative scan over
time ([BS, BK, BV] tiles), carrying the state from block to block. The forward stores the state
at every block start; the backward recomputes each block from there, in reverse:

    ĝ_t = s_t dy_tᵀ + o_{t+1} ⊙ ĝ_{t+1}  (a reverse scan; ĝ_T starts from dht)
    ds_t = m_t dy_t,  de_t = ĝ_t i_t,  di_t = ĝ_tᵀ e_t,  d(log o_t) = ĝ_t ⊙ o_t ⊙ m_{t-1}

m_{t-1} and o_{t+1} come from loading the block shifted by one row, not from dividing by o.
Sums over the K or V tiles (y, ds, de, di, gate gradients) go to per-tile buffers summed on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk import LOG_ZERO, TUNE, autotune


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _log_decay(rows, m_rows, bos, i_h, o_k, m_k, o_v, m_v, g, gk, gv, gs, gks, gvs, dt, A, b_A,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr,
               GK_STATIC: tl.constexpr, USE_GV: tl.constexpr, GV_STATIC: tl.constexpr,
               USE_DT: tl.constexpr, A_MODE: tl.constexpr):
    """log o at the given rows: [BS, BK, BV] fp32, 0 on rows outside the sequence."""
    lo = tl.zeros([BS, BK, BV], dtype=tl.float32)
    if USE_DT:
        b_dt = tl.load(dt + ((bos + rows)[:, None] * H + i_h) * V + o_v[None, :], mask=m_rows[:, None] & m_v[None, :], other=0.0)
        lo += b_dt.to(tl.float32)[:, None, :] * b_A[None, :, :]
    elif A_MODE == 1:
        lo += tl.where(m_rows[:, None, None], b_A[None, :, :], 0.0)
    elif A_MODE == 2:
        p = ((((bos + rows)[:, None, None] * H + i_h) * K + o_k[None, :, None]) * V + o_v[None, None, :])
        lo += tl.load(A + p, mask=m_rows[:, None, None] & m_k[None, :, None] & m_v[None, None, :], other=0.0).to(tl.float32)
    if USE_GK:
        if GK_STATIC:
            b = tl.where(m_rows[:, None], tl.load(gks + i_h * K + o_k, mask=m_k, other=0.0)[None, :], 0.0)
        else:
            b = tl.load(gk + ((bos + rows)[:, None] * H + i_h) * K + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        lo += b.to(tl.float32)[:, :, None]
    if USE_GV:
        if GV_STATIC:
            b = tl.where(m_rows[:, None], tl.load(gvs + i_h * V + o_v, mask=m_v, other=0.0)[None, :], 0.0)
        else:
            b = tl.load(gv + ((bos + rows)[:, None] * H + i_h) * V + o_v[None, :], mask=m_rows[:, None] & m_v[None, :], other=0.0)
        lo += b.to(tl.float32)[:, None, :]
    if USE_G:
        if G_STATIC:
            b = tl.where(m_rows, tl.load(gs + i_h), 0.0)
        else:
            b = tl.load(g + (bos + rows) * H + i_h, mask=m_rows, other=0.0)
        lo += b.to(tl.float32)[:, None, None]
    return tl.maximum(lo, LOG_ZERO)  # -inf (o = 0) floored like the chunked kernels


@triton.jit
def _rows(X, bos, rows, m_rows, i_h, cols, m_c, H: tl.constexpr, D: tl.constexpr):
    return tl.load(X + ((bos + rows)[:, None] * H + i_h) * D + cols[None, :], mask=m_rows[:, None] & m_c[None, :], other=0.0).to(tl.float32)


# The V tile is tuned, not fixed: with a small K (Mamba's 16) the grid is only N·H·V/BV programs
# long, and narrower tiles buy the parallelism that hides the latency of the sequential block loop.
FWD_CONFIGS = [triton.Config({"BV": bv}, num_warps=w) for bv, w in
               ((32, 4), (16, 1), (16, 2), (32, 2), (32, 8), (64, 4), (64, 8), (128, 8))]


def _prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # constexprs arrive as keywords
    V, BK = args["V"], args["BK"]
    keep = [c for c in configs if c.kwargs["BV"] <= max(16, triton.next_power_of_2(V)) and BK * c.kwargs["BV"] <= 4096]
    return keep or configs[:1]


@triton.autotune(configs=FWD_CONFIGS if TUNE else FWD_CONFIGS[:1],
                 key=["H", "K", "V", "BK", "USE_DT", "A_MODE", "STORE_STATES"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["T"])
def scan_fwd_kernel(
    q, k, v, g, gk, gv, gs, gks, gvs, dt, A, h0, y, states, ht, cu, blk_off, T, NTOT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, USE_DT: tl.constexpr, A_MODE: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_STATES: tl.constexpr,
):
    """y (partial over K tiles: y[i_k], in y's dtype) and, for the backward, the state at every block start."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int32)
        Tn = tl.load(cu + i_n + 1).to(tl.int32) - bos
        c0 = tl.load(blk_off + i_n).to(tl.int32)
    else:
        bos = i_n * T
        Tn = T
        c0 = i_n * tl.cdiv(T, BS)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    r = tl.arange(0, BS)
    b_A = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DT or A_MODE == 1:
        b_A += tl.load(A + (i_h * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    b_m = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_m += tl.load(h0 + (i_nh * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
    for i_b in range(tl.cdiv(Tn, BS)):
        if STORE_STATES:
            tl.store(states + (((c0 + i_b) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], b_m, mask=m_kv)
        rows = i_b * BS + r
        m_r = rows < Tn
        lo = _log_decay(rows, m_r, bos, i_h, o_k, m_k, o_v, m_v, g, gk, gv, gs, gks, gvs, dt, A, b_A, H, K, V, BS, BK, BV,
                        USE_G, G_STATIC, USE_GK, GK_STATIC, USE_GV, GV_STATIC, USE_DT, A_MODE)
        b_a = tl.exp(lo)
        b_e = _rows(k, bos, rows, m_r, i_h, o_k, m_k, H, K)
        b_i = _rows(v, bos, rows, m_r, i_h, o_v, m_v, H, V)
        b_b = b_e[:, :, None] * b_i[:, None, :] + tl.where((r == 0)[:, None, None], b_a * b_m[None, :, :], 0.0)
        _, b_ms = tl.associative_scan((b_a, b_b), 0, _combine)
        b_s = _rows(q, bos, rows, m_r, i_h, o_k, m_k, H, K)
        b_y = tl.sum(b_ms * b_s[:, :, None], axis=1)
        tl.store(y + ((i_k * NTOT + bos + rows)[:, None] * H + i_h) * V + o_v[None, :], b_y.to(y.dtype.element_ty),
                 mask=m_r[:, None] & m_v[None, :])
        b_m = tl.sum(tl.where((r == BS - 1)[:, None, None], b_ms, 0.0), axis=0)  # padded rows keep the state
    if STORE_HT:
        tl.store(ht + (i_nh * K + o_k[:, None]) * V + o_v[None, :], b_m, mask=m_kv)


@autotune([triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)], key=["H", "K", "V", "BK", "BV", "USE_DT", "A_MODE"])
@triton.jit(do_not_specialize=["T"])
def scan_bwd_kernel(
    q, k, v, g, gk, gv, gs, gks, gvs, dt, A, states, dy, dht, dh0,
    dq, dk, dv, dg, dgk, dgv, ddt, dA, cu, blk_off, T, NTOT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, G_STATIC: tl.constexpr, USE_GK: tl.constexpr, GK_STATIC: tl.constexpr,
    USE_GV: tl.constexpr, GV_STATIC: tl.constexpr, USE_DT: tl.constexpr, A_MODE: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Per-tile partial gradients: dq, dk, dgk, dg over V tiles (dq[i_v]); dv, dgv, ddt over K tiles;
    dA per token, or summed over the sequence for a static A (dA[i_n])."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int32)
        Tn = tl.load(cu + i_n + 1).to(tl.int32) - bos
        c0 = tl.load(blk_off + i_n).to(tl.int32)
    else:
        bos = i_n * T
        Tn = T
        c0 = i_n * tl.cdiv(T, BS)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    r = tl.arange(0, BS)
    b_A = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DT or A_MODE == 1:
        b_A += tl.load(A + (i_h * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    b_dA = tl.zeros([BK, BV], dtype=tl.float32)  # static A: Σ_t d(log o_t) (⊙ dt_t)
    b_carry = tl.zeros([BK, BV], dtype=tl.float32)  # ∂L/∂m at the block's last row, from later tokens
    if HAS_DHT:
        b_carry += tl.load(dht + (i_nh * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
    NB = tl.cdiv(Tn, BS)
    for i_back in range(NB):
        i_b = NB - 1 - i_back
        rows = i_b * BS + r
        m_r = rows < Tn
        last = tl.minimum(BS, Tn - i_b * BS) - 1
        b_m0 = tl.load(states + (((c0 + i_b) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
        # m_{t-1}: an inclusive scan over the block shifted down one row, seeded with the block's state
        prev = rows - 1
        m_p = (r > 0) & m_r
        lo_p = _log_decay(prev, m_p, bos, i_h, o_k, m_k, o_v, m_v, g, gk, gv, gs, gks, gvs, dt, A, b_A, H, K, V, BS, BK, BV,
                          USE_G, G_STATIC, USE_GK, GK_STATIC, USE_GV, GV_STATIC, USE_DT, A_MODE)
        b_ap = tl.where((r == 0)[:, None, None], 0.0, tl.exp(lo_p))
        b_bp = _rows(k, bos, prev, m_p, i_h, o_k, m_k, H, K)[:, :, None] * _rows(v, bos, prev, m_p, i_h, o_v, m_v, H, V)[:, None, :]
        b_bp += tl.where((r == 0)[:, None, None], b_m0[None, :, :], 0.0)
        _, b_mprev = tl.associative_scan((b_ap, b_bp), 0, _combine)
        lo = _log_decay(rows, m_r, bos, i_h, o_k, m_k, o_v, m_v, g, gk, gv, gs, gks, gvs, dt, A, b_A, H, K, V, BS, BK, BV,
                        USE_G, G_STATIC, USE_GK, GK_STATIC, USE_GV, GV_STATIC, USE_DT, A_MODE)
        b_a = tl.exp(lo)
        b_e = _rows(k, bos, rows, m_r, i_h, o_k, m_k, H, K)
        b_i = _rows(v, bos, rows, m_r, i_h, o_v, m_v, H, V)
        b_om = b_a * b_mprev  # o_t ⊙ m_{t-1}
        b_mt = b_om + b_e[:, :, None] * b_i[:, None, :]
        # ĝ_t = s_t dy_tᵀ + o_{t+1} ⊙ ĝ_{t+1}: a reverse scan with the decay of the next row
        nxt = rows + 1
        m_n = (r < last) & m_r
        lo_n = _log_decay(nxt, m_n, bos, i_h, o_k, m_k, o_v, m_v, g, gk, gv, gs, gks, gvs, dt, A, b_A, H, K, V, BS, BK, BV,
                          USE_G, G_STATIC, USE_GK, GK_STATIC, USE_GV, GV_STATIC, USE_DT, A_MODE)
        b_an = tl.exp(lo_n)
        b_s = _rows(q, bos, rows, m_r, i_h, o_k, m_k, H, K)
        b_dy = _rows(dy, bos, rows, m_r, i_h, o_v, m_v, H, V)
        b_gb = b_s[:, :, None] * b_dy[:, None, :] + tl.where((r == last)[:, None, None], b_carry[None, :, :], 0.0)
        _, b_gh = tl.associative_scan((b_an, b_gb), 0, _combine, reverse=True)
        b_gh = tl.where(m_r[:, None, None], b_gh, 0.0)
        # gradients of this block
        pk = ((i_v * NTOT + bos + rows)[:, None] * H + i_h) * K + o_k[None, :]
        mk = m_r[:, None] & m_k[None, :]
        pv = ((i_k * NTOT + bos + rows)[:, None] * H + i_h) * V + o_v[None, :]
        mv = m_r[:, None] & m_v[None, :]
        tl.store(dq + pk, tl.sum(b_mt * b_dy[:, None, :], axis=2), mask=mk)
        tl.store(dk + pk, tl.sum(b_gh * b_i[:, None, :], axis=2), mask=mk)
        tl.store(dv + pv, tl.sum(b_gh * b_e[:, :, None], axis=1), mask=mv)
        b_dlo = b_gh * b_om
        if USE_GK:
            tl.store(dgk + pk, tl.sum(b_dlo, axis=2), mask=mk)
        if USE_GV:
            tl.store(dgv + pv, tl.sum(b_dlo, axis=1), mask=mv)
        if USE_G:
            tl.store(dg + (i_k * tl.num_programs(0) + i_v) * NTOT * H + (bos + rows) * H + i_h, tl.sum(tl.sum(b_dlo, axis=2), axis=1), mask=m_r)
        if USE_DT:
            b_dt = tl.load(dt + ((bos + rows)[:, None] * H + i_h) * V + o_v[None, :], mask=mv, other=0.0).to(tl.float32)
            tl.store(ddt + pv, tl.sum(b_dlo * b_A[None, :, :], axis=1), mask=mv)
            b_dA += tl.sum(b_dlo * b_dt[:, None, :], axis=0)
        elif A_MODE == 1:
            b_dA += tl.sum(b_dlo, axis=0)
        elif A_MODE == 2:
            p = ((((bos + rows)[:, None, None] * H + i_h) * K + o_k[None, :, None]) * V + o_v[None, None, :])
            tl.store(dA + p, b_dlo, mask=m_r[:, None, None] & m_k[None, :, None] & m_v[None, None, :])
        # what flows into the previous block's last row: o_{t0} ⊙ ĝ_{t0}
        b_carry = tl.sum(tl.where((r == 0)[:, None, None], b_a * b_gh, 0.0), axis=0)
    if USE_DT or A_MODE == 1:
        tl.store(dA + ((i_n * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], b_dA, mask=m_kv)
    if STORE_DH0:
        tl.store(dh0 + (i_nh * K + o_k[:, None]) * V + o_v[None, :], b_carry, mask=m_kv)
