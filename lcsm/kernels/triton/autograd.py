"""Host side of the chunked Triton kernels: buffers, grids, and the autograd Function.

The backward is hand-written (kernels in chunk.py); gate gradients come from the identity
d(cumulative log gate) = q ⊙ dq - k ⊙ dk along K (o ⊙ do - v ⊙ dv along V), summed within each chunk
with the chunk's state term (chunk_gate_grad_kernel, or the tail of chunk_dqdk_gk_inter_kernel
for a decay along K).
"""

from __future__ import annotations

import os

import torch
import triton

from ..decay import LOG_ZERO, Decay
from . import chunk as tk
from . import scan as ts
from . import segments as sg

BT, BC = tk.BT, tk.BC
# LCSM_STATE_SEGMENTS (read once): split the state kernels' walk over the chunks into segments
# (segments.py, docs/kernels.md) — None (unset or "off": today's path), "auto", or chunks per segment
STATE_SEGMENTS = sg.parse_setting(os.environ.get(sg.ENV))


class Layout:
    """Chunk bookkeeping for a batch [B,T] or packed sequences (cu_seqlens, B = 1); chunks of `block` tokens."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device, block: int = BT):
        self.B, self.T, self.cu = B, T, None
        if cu_seqlens is None:
            self.N = B
            self.NT = triton.cdiv(T, block)  # chunks per sequence
            self.n_chunks = B * self.NT
            self.chunk_idx = self.chunk_off = None
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.int32)
            lens = (cu[1:] - cu[:-1]).long()
            per_seq = (lens + block - 1) // block
            self.cu = cu
            self.N = lens.numel()
            self.n_chunks = int(per_seq.sum())
            self.NT = self.n_chunks
            self.chunk_off = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)]).to(torch.int32)
            seq = torch.repeat_interleave(torch.arange(self.N, device=device), per_seq)
            within = torch.arange(self.n_chunks, device=device) - self.chunk_off[:-1].long()[seq]
            self.chunk_idx = torch.stack([seq, within], dim=1).to(torch.int32).contiguous()
            self.lens = lens

    @property
    def varlen(self) -> bool:
        return self.cu is not None

    def chunk_grid(self, H: int) -> tuple[int, int]:
        """(chunks, heads·batch) for the per-chunk kernels."""
        return (self.NT, self.B * H) if not self.varlen else (self.n_chunks, H)


def chunk_cumsum(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Chunk-local inclusive cumsum of a per-token gate [B,T,H] or [B,T,H,D], in fp32."""
    B, T, H = x.shape[:3]
    D = x.shape[3] if x.dim() == 4 else 1
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    BD = min(64, triton.next_power_of_2(D))
    nt, nbh = lay.chunk_grid(H)
    tk.chunk_cumsum_kernel[(triton.cdiv(D, BD), nt, nbh)](
        x, out, lay.cu, lay.chunk_idx, T, H=H, D=D, BT=BT, BD=BD, IS_VARLEN=lay.varlen
    )
    return out


class Gates:
    """The decays of one call as the kernels take them: per-token gates chunk-cumsummed (floored at
    LOG_ZERO inside the cumsum kernel), static ones [H] / [H,K] / [H,V] fp32, floored here. A scalar
    g comes here only without gk (Decay.fold_scalar)."""

    def __init__(self, decay: Decay, lay: Layout):
        assert decay.g is None or decay.gk is None, "fold g into gk first (Decay.fold_scalar)"
        names = ("g", "gk", "gv")
        self.use = {n: getattr(decay, n) is not None for n in names}
        self.static = {n: decay.is_static(n) for n in names}
        self.cum, self.stat = {}, {}
        for n in names:
            x = getattr(decay, n)
            if x is None:
                self.cum[n] = self.stat[n] = None
            elif self.static[n]:
                self.cum[n], self.stat[n] = None, x.float().clamp_min(LOG_ZERO).contiguous()
            else:
                self.cum[n], self.stat[n] = chunk_cumsum(x, lay), None

    def kwargs(self) -> dict:
        return dict(
            USE_G=self.use["g"], G_STATIC=self.static["g"], USE_GK=self.use["gk"], GK_STATIC=self.static["gk"],
            USE_GV=self.use["gv"], GV_STATIC=self.static["gv"],
        )


def state_buffer_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision inputs keep the chunk states in their dtype (as fla does): half the traffic.
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _state_fwd(k, v, gates: Gates, h0, lay, store_ht: bool):
    """chunk_state_fwd_kernel over `lay` (a Layout, or a SegmentPlan's segments): (h, ht or None)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    h = torch.empty(lay.n_chunks, H, K, V, dtype=state_buffer_dtype(k), device=k.device)
    ht = torch.zeros(lay.N, H, K, V, dtype=torch.float32, device=k.device) if store_ht else None
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), lay.N * H)
    tk.chunk_state_fwd_kernel[grid](
        k, v, gates.cum["g"], gates.cum["gk"], gates.cum["gv"], gates.stat["g"], gates.stat["gk"], gates.stat["gv"],
        h, h0, ht, lay.cu, lay.chunk_off, T, H=H, K=K, V=V, BT=BT, HAS_H0=h0 is not None,
        STORE_HT=store_ht, IS_VARLEN=lay.varlen, **gates.kwargs(),
    )
    return h, ht


def chunk_states(k, v, gates: Gates, h0, lay: Layout, store_ht: bool, seg=None):
    """h [n_chunks, H, K, V]: the state before every chunk; ht [N, H, K, V] fp32 or None.

    seg: (SegmentPlan, SegmentDecays) to split the walk into segments (segments.py): local states
    per segment from the same kernel, then a carry over the segments and a correction in torch."""
    if seg is None:
        return _state_fwd(k, v, gates, h0, lay, store_ht)
    plan, dec = seg
    h, ht_local = _state_fwd(k, v, gates, None, plan, True)
    h, ht = sg.fix_states(h, ht_local, plan, dec, h0, lay.N)
    return h, (ht if store_ht else None)


def chunk_state_grads(q, do, gates: Gates, dht, with_dh0: bool, lay: Layout, seg=None):
    """dh [n_chunks, H, K, V] (∂L/∂ the state after every chunk, through the later chunks) and dh0
    [N, H, K, V] fp32 or None; seg as in chunk_states."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    c, s, kw = gates.cum, gates.stat, gates.kwargs()
    walk = lay if seg is None else seg[0]
    dh = torch.empty(walk.n_chunks, H, K, V, dtype=state_buffer_dtype(q), device=q.device)
    store_dh0 = with_dh0 or seg is not None
    dh0 = torch.empty(walk.N, H, K, V, dtype=torch.float32, device=q.device) if store_dh0 else None
    dht_k = dht if seg is None else None
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), walk.N * H)
    tk.chunk_state_bwd_kernel[grid](
        q, do, c["g"], c["gk"], c["gv"], s["g"], s["gk"], s["gv"], dh, dht_k, dh0, walk.cu, walk.chunk_off, T,
        H=H, K=K, V=V, BT=BT, HAS_DHT=dht_k is not None, STORE_DH0=store_dh0,
        IS_VARLEN=walk.varlen, **kw,
    )
    if seg is not None:
        dh, dh0 = sg.fix_state_grads(dh, dh0, *seg, dht, lay.N)
    return dh, (dh0 if with_dh0 else None)


def chunk_scores(a, b, L_cum, L_stat, G_cum, G_stat, lay: Layout) -> torch.Tensor:
    """S [B,T,H,BT] fp32: S[t, s] = Σ_d a_td b_sd exp(L_td - L_sd) (or exp(G_t - G_s)) for s <= t."""
    B, T, H, D = a.shape
    S = torch.empty(B, T, H, BT, dtype=torch.float32, device=a.device)
    nt, nbh = lay.chunk_grid(H)
    if L_cum is not None or L_stat is not None:
        tk.chunk_scores_decay_kernel[(BT // BC, nt, nbh)](
            a, b, L_cum, L_stat, S, lay.cu, lay.chunk_idx, T, H=H, D=D, BT=BT, BC=BC,
            BDF=max(16, triton.next_power_of_2(D)), L_STATIC=L_stat is not None, IS_VARLEN=lay.varlen,
        )
    else:
        tk.chunk_scores_kernel[(nt, nbh)](
            a, b, G_cum, G_stat, S, lay.cu, lay.chunk_idx, T, H=H, D=D, BT=BT,
            USE_G=G_cum is not None or G_stat is not None, G_STATIC=G_stat is not None, IS_VARLEN=lay.varlen,
        )
    return S


def chunk_forward(q, k, v, gates: Gates, h0, lay: Layout, store_ht: bool, seg=None):
    """Returns (o [B,T,H,V] in q.dtype, ht, A or None, o without its s = t terms (fp32)
    or None, h [n_chunks,H,K,V] the state before every chunk). o_strict exists only with a decay
    along V, whose gradient needs it; h is what the backward would otherwise walk again.
    seg: see chunk_states."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    h, ht = chunk_states(k, v, gates, h0, lay, store_ht, seg)
    A = None
    if gates.use["gk"]:
        A = chunk_scores(q, k, gates.cum["gk"], gates.stat["gk"], None, None, lay)
    elif gates.use["gv"]:
        A = chunk_scores(q, k, None, None, gates.cum["g"], gates.stat["g"], lay)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    nt, nbh = lay.chunk_grid(H)
    common = dict(H=H, K=K, V=V, BT=BT, USE_G=gates.use["g"], G_STATIC=gates.static["g"], USE_GK=gates.use["gk"],
                  GK_STATIC=gates.static["gk"], IS_VARLEN=lay.varlen)
    o_strict = None
    if gates.use["gv"]:
        o_strict = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt * (BT // BC), nbh)
        tk.chunk_output_gv_kernel[grid](
            q, k, v, h, gates.cum["g"], gates.cum["gk"], gates.cum["gv"], gates.stat["g"], gates.stat["gk"],
            gates.stat["gv"], A, o, o_strict, lay.cu, lay.chunk_idx, T, BC=BC, GV_STATIC=gates.static["gv"], **common,
        )
    else:
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt, nbh)
        tk.chunk_output_kernel[grid](
            q, k, v, h, gates.cum["g"], gates.cum["gk"], gates.stat["g"], gates.stat["gk"], A, o,
            lay.cu, lay.chunk_idx, T, USE_A=A is not None, **common,
        )
    return o, ht, A, o_strict, h


def chunk_backward(q, k, v, o_strict, do, dht, gates: Gates, h0, A, lay: Layout, seg=None, h=None):
    """Gradients: (dq, dk, dv in the input dtype, dh0 fp32 or None, {g, gk, gv: per-token fp32 or None}).
    seg: see chunk_states; h: the forward's chunk states (None: walked again here)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    do = do.contiguous()
    c, s, kw = gates.cum, gates.stat, gates.kwargs()
    if h is None:
        h, _ = chunk_states(k, v, gates, h0, lay, False, seg)
    dh, dh0 = chunk_state_grads(q, do, gates, dht, h0 is not None, lay, seg)
    dA = None
    if gates.use["gk"] or gates.use["gv"]:
        dA = chunk_scores(do, v, c["gv"], s["gv"], None, None, lay)
    nt, nbh = lay.chunk_grid(H)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # the three parts (a, b, c) of each gate's gradient, assembled by chunk_gate_grad_kernel
    parts = {n: None for n in ("g", "gk", "gv")}
    if gates.use["gv"]:
        parts["gv"] = gate_grad_parts((B, T, H, V), (lay.n_chunks, H, V), q.device)
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt * (BT // BC), nbh)
        tk.chunk_dv_gv_kernel[grid](
            q, k, v, do, o_strict, h, dh, c["g"], c["gk"], c["gv"], s["g"], s["gk"], s["gv"], A, dv, *parts["gv"],
            lay.cu, lay.chunk_idx, T, H=H, K=K, V=V, BT=BT, BC=BC, USE_G=kw["USE_G"], G_STATIC=kw["G_STATIC"],
            USE_GK=kw["USE_GK"], GK_STATIC=kw["GK_STATIC"], GV_STATIC=kw["GV_STATIC"], IS_VARLEN=lay.varlen,
        )
    else:
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), nt, nbh)
        tk.chunk_dv_kernel[grid](
            q, k, do, dh, c["g"], c["gk"], s["g"], s["gk"], A, dv, lay.cu, lay.chunk_idx, T,
            H=H, K=K, V=V, BT=BT, USE_G=kw["USE_G"], G_STATIC=kw["G_STATIC"], USE_GK=kw["USE_GK"],
            GK_STATIC=kw["GK_STATIC"], USE_A=A is not None, IS_VARLEN=lay.varlen,
        )
    dgk = None  # the K-decay kernels assemble the gradient of Gk themselves
    if gates.use["gk"]:
        dgk = dqdk_gk(q, k, v, do, h, dh, gates, dA, dq, dk, lay)
    else:
        tiles = None
        if gates.use["g"]:  # one partial sum per K tile; the largest tile count is K / 32
            nkt = triton.cdiv(K, 32)
            tiles = gate_grad_parts((nkt, B, T, H), (nkt, lay.n_chunks, H), q.device, zero=True)
        # the autotuner zeroes these between its trials: real (unused) buffers without a scalar decay
        parts_or_unused = tiles or tuple(torch.zeros(1, device=q.device) for _ in range(3))
        grid = lambda meta: (triton.cdiv(K, meta["BK"]), nt, nbh)
        tk.chunk_dqdk_kernel[grid](
            q, k, v, do, h, dh, c["g"], c["gv"], s["g"], s["gv"], dA, dq, dk, *parts_or_unused, lay.cu,
            lay.chunk_idx, T, B * T, lay.n_chunks, H=H, K=K, V=V, BT=BT, USE_G=kw["USE_G"], G_STATIC=kw["G_STATIC"], USE_GV=kw["USE_GV"],
            GV_STATIC=kw["GV_STATIC"], IS_VARLEN=lay.varlen,
        )
        if tiles is not None:
            parts["g"] = tuple(x.sum(0) for x in tiles)
    dG = {n: None if p is None else gate_grad(*p, lay) for n, p in parts.items()}
    if dgk is not None:
        dG["gk"] = dgk
    return dq, dk, dv, dh0, dG


def dqdk_gk(q, k, v, do, h, dh, gates: Gates, dA, dq, dk, lay: Layout) -> torch.Tensor:
    """dq, dk (written in place) with a decay along K, in two kernels: the intra-chunk terms over
    16-row sub-chunks into fp32 buffers, then the inter-chunk matmuls over 64-row chunks, which add
    them and assemble the gradient of the per-token Gk: returned, [B,T,H,K] fp32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    c, s, kw = gates.cum, gates.stat, gates.kwargs()
    nt, nbh = lay.chunk_grid(H)
    # fp32 partials, 8 bytes per element written and read once; the other order (inter first,
    # intra writing the gate gradient's parts for chunk_gate_grad_kernel) would move twice that
    dq_intra = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk_intra = torch.empty_like(dq_intra)
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), nt * (BT // BC), nbh)
    tk.chunk_dqdk_gk_intra_kernel[grid](
        q, k, c["gk"], s["gk"], dA, dq_intra, dk_intra, lay.cu, lay.chunk_idx, T,
        H=H, K=K, BT=BT, BC=BC, GK_STATIC=kw["GK_STATIC"], IS_VARLEN=lay.varlen,
    )
    dg = torch.empty_like(dq_intra)
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), nt, nbh)
    tk.chunk_dqdk_gk_inter_kernel[grid](
        q, k, v, do, h, dh, c["gk"], c["gv"], s["gk"], s["gv"], dq_intra, dk_intra, dq, dk, dg,
        lay.cu, lay.chunk_idx, T, H=H, K=K, V=V, BT=BT, GK_STATIC=kw["GK_STATIC"], USE_GV=kw["USE_GV"],
        GV_STATIC=kw["GV_STATIC"], IS_VARLEN=lay.varlen,
    )
    return dg


def gate_grad_parts(per_token: tuple, per_chunk: tuple, device, zero: bool = False):
    """fp32 buffers (a, b [*per_token], c [*per_chunk]) for the parts of a gate gradient. The scalar
    decay's are partial sums per K tile, zeroed: the kernel may use fewer tiles than allocated."""
    new = torch.zeros if zero else torch.empty
    return tuple(new(shape, dtype=torch.float32, device=device) for shape in (per_token, per_token, per_chunk))


def gate_grad(a, b, c, lay: Layout) -> torch.Tensor:
    """The per-token gate gradient [B,T,H] or [B,T,H,D] from its parts (chunk_gate_grad_kernel)."""
    B, T, H = a.shape[:3]
    D = a.shape[3] if a.dim() == 4 else 1
    out = torch.empty_like(a)
    BD = min(64, triton.next_power_of_2(D))
    nt, nbh = lay.chunk_grid(H)
    tk.chunk_gate_grad_kernel[(triton.cdiv(D, BD), nt, nbh)](
        a, b, c, out, lay.cu, lay.chunk_idx, T, H=H, D=D, BT=BT, BD=BD, IS_VARLEN=lay.varlen
    )
    return out


def segments_of(gates: Gates, lay: Layout, H: int, device):
    """(SegmentPlan, SegmentDecays) when LCSM_STATE_SEGMENTS splits this call's state passes, else None."""
    plan = sg.plan(STATE_SEGMENTS, lay.B, lay.T, H, lay.cu, device)
    return None if plan is None else (plan, sg.SegmentDecays(gates, plan, H, device))


def chunk_fwd(q, k, v, g, gk, gv, h0, output_final_state: bool, cu_seqlens):
    """The chunked forward: (o [B,T,H,V] in q.dtype, ht [N,H,K,V] fp32 or None, and what the
    backward reads: the scores A or None, o without its s = t terms (fp32, decays along V) or None,
    the chunk states h [n_chunks,H,K,V] in the state buffer's dtype). q, k, v contiguous; g is never
    given with gk (Decay.fold_scalar)."""
    h0 = None if h0 is None else h0.float().contiguous()
    lay = Layout(q.shape[0], q.shape[1], cu_seqlens, q.device)
    gates = Gates(Decay(g=g, gk=gk, gv=gv), lay)
    seg = segments_of(gates, lay, q.shape[2], q.device)
    return chunk_forward(q, k, v, gates, h0, lay, store_ht=output_final_state, seg=seg)


def chunk_bwd(q, k, v, g, gk, gv, h0, A, o_strict, cu_seqlens, do, dht, h=None):
    """The chunked backward: (dq, dk, dv in their inputs' dtypes, dg, dgk, dgv in the gates'
    dtypes (static gates summed over tokens) or None, dh0 fp32 or None). h: the forward's chunk
    states, kept for the backward (one state walk fewer per call; None: walked again)."""
    lay = Layout(q.shape[0], q.shape[1], cu_seqlens, q.device)
    decay = Decay(g=g, gk=gk, gv=gv)
    gates = Gates(decay, lay)
    h0 = None if h0 is None else h0.float().contiguous()
    dht = None if dht is None else dht.float().contiguous()
    seg = segments_of(gates, lay, q.shape[2], q.device)
    dq, dk, dv, dh0, dG = chunk_backward(q, k, v, o_strict, do, dht, gates, h0, A, lay, seg, h)
    grads = []
    for name, x in (("g", g), ("gk", gk), ("gv", gv)):
        d = dG[name]
        if x is None:
            grads.append(None)
        elif decay.is_static(name):  # the same gate at every token
            grads.append(d.sum((0, 1)).to(x.dtype))
        else:
            grads.append(d.to(x.dtype))
    return (dq, dk, dv, *grads, dh0)


class ChunkEOS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, gk, gv, h0, output_final_state, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ctx.h0_dtype = None if h0 is None else h0.dtype
        o, ht, A, o_strict, h = chunk_fwd(q, k, v, g, gk, gv, h0, output_final_state, cu_seqlens)
        # the chunk states too: the backward would walk the chunks again for them (a state per
        # chunk of 64 tokens, in bf16 under bf16 inputs: H·K·V/32 bytes per token)
        ctx.save_for_backward(q, k, v, g, gk, gv, h0, o_strict, A, cu_seqlens, h)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, gk, gv, h0, o_strict, A, cu_seqlens, h = ctx.saved_tensors
        *grads, dh0 = chunk_bwd(q, k, v, g, gk, gv, h0, A, o_strict, cu_seqlens, do, dht, h)
        return (*grads, None if dh0 is None else dh0.to(ctx.h0_dtype), None, None)


def chunk_eos(q, k, v, decay: Decay, h0=None, output_final_state=False, cu_seqlens=None):
    """The chunked Triton recurrence for the separable decays (see lcsm/kernels/api.py for the contract)."""
    decay = decay.fold_scalar()
    return ChunkEOS.apply(q, k, v, decay.g, decay.gk, decay.gv, h0, output_final_state, cu_seqlens)


# --------------------------------------------------------------------------- scan (any decay)

BS = 16  # tokens per scan block; the forward stores the state at every block start


def _scan_tiles(K: int, V: int) -> tuple[int, int]:
    # a [BS, BK, BV] tile per scan operand: keep it near 8K elements
    BK = min(32, triton.next_power_of_2(K))
    BV = min(triton.next_power_of_2(V), max(16, 8192 // (BS * BK)))
    return BK, BV


def scan_fwd(q, k, v, g, gk, gv, dt, A, h0, output_final_state: bool, cu_seqlens, store_states: bool):
    """The scan forward: (y [B,T,H,V] in q.dtype, ht [N,H,K,V] fp32 or None, the block-start states
    [n_blocks,H,K,V] fp32 that the backward reads — one unused block when store_states is False)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dt = None if dt is None else dt.contiguous()
    A = None if A is None else A.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = Layout(B, T, cu_seqlens, q.device, block=BS)
    BK, BV = _scan_tiles(K, V)
    NK = triton.cdiv(K, BK)
    decay = Decay(g=g, gk=gk, gv=gv, dt=dt, A=A)
    flags = decay_flags(decay)
    per_tok, static = _scan_gates(decay)
    h0c = None if h0 is None else h0.float().contiguous()
    # one K tile writes y in its final dtype; several write fp32 partial sums
    y = torch.empty(NK, B, T, H, V, dtype=q.dtype if NK == 1 else torch.float32, device=q.device)
    # the block-start states are only for the backward: inference skips writing them
    states = torch.empty(lay.n_chunks if store_states else 1, H, K, V, dtype=torch.float32, device=q.device)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), NK, lay.N * H)  # noqa: E731
    ts.scan_fwd_kernel[grid](
        q, k, v, *per_tok, *static, dt, A, h0c, y, states, ht, lay.cu, lay.chunk_off, T, B * T,
        H=H, K=K, V=V, BS=BS, BK=BK, HAS_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=lay.varlen, STORE_STATES=store_states, **flags,
    )
    y = y[0] if NK == 1 else y.sum(0)
    return y.to(q.dtype), ht, states


def scan_bwd(q, k, v, g, gk, gv, dt, A, states, cu_seqlens, dy, dht, with_dh0: bool):
    """The scan backward: (dq, dk, dv, dg, dgk, dgv, ddt, dA in their inputs' dtypes or None, dh0
    fp32 or None)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dt = None if dt is None else dt.contiguous()
    A = None if A is None else A.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = Layout(B, T, cu_seqlens, q.device, block=BS)
    BK, BV = _scan_tiles(K, V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    decay = Decay(g=g, gk=gk, gv=gv, dt=dt, A=A)
    flags = decay_flags(decay)
    per_tok, static = _scan_gates(decay)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty(NV, B, T, H, K, **f32)
    dk = torch.empty(NV, B, T, H, K, **f32)
    dv = torch.empty(NK, B, T, H, V, **f32)
    dg = torch.empty(NK * NV, B, T, H, **f32) if g is not None else None
    dgk = torch.empty(NV, B, T, H, K, **f32) if gk is not None else None
    dgv = torch.empty(NK, B, T, H, V, **f32) if gv is not None else None
    ddt = torch.empty(NK, B, T, H, V, **f32) if dt is not None else None
    dA = None
    if A is not None:
        dA = torch.zeros(lay.N, H, K, V, **f32) if decay.is_static("A") else torch.empty(A.shape, **f32)
    dh0 = torch.empty(lay.N, H, K, V, **f32) if with_dh0 else None
    ts.scan_bwd_kernel[(NV, NK, lay.N * H)](
        q, k, v, *per_tok, *static, dt, A, states, dy.contiguous(), None if dht is None else dht.float().contiguous(),
        dh0, dq, dk, dv, dg, dgk, dgv, ddt, dA, lay.cu, lay.chunk_off, T, B * T,
        H=H, K=K, V=V, BS=BS, BK=BK, BV=BV, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=lay.varlen, **flags,
    )
    grads = [dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)]
    for name, d in (("g", dg), ("gk", dgk), ("gv", dgv)):
        x = getattr(decay, name)
        if x is None:
            grads.append(None)
        else:
            d = d.sum(0)
            grads.append((d.sum((0, 1)) if decay.is_static(name) else d).to(x.dtype))
    grads.append(None if dt is None else ddt.sum(0).to(dt.dtype))
    grads.append(None if A is None else (dA.sum(0) if decay.is_static("A") else dA).to(A.dtype))
    return (*grads, dh0)


class ScanEOS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, gk, gv, dt, A, h0, output_final_state, cu_seqlens):
        y, ht, states = scan_fwd(q, k, v, g, gk, gv, dt, A, h0, output_final_state, cu_seqlens,
                                 store_states=any(ctx.needs_input_grad[:9]))
        ctx.save_for_backward(q, k, v, g, gk, gv, dt, A, states, cu_seqlens)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        q, k, v, g, gk, gv, dt, A, states, cu_seqlens = ctx.saved_tensors
        *grads, dh0 = scan_bwd(q, k, v, g, gk, gv, dt, A, states, cu_seqlens, dy, dht, ctx.h0_dtype is not None)
        return (*grads, None if dh0 is None else dh0.to(ctx.h0_dtype), None, None)


def decay_flags(decay: Decay) -> dict:
    """The compile-time flags of a decay: which tensors are given and which are static."""
    return dict(
        USE_G=decay.g is not None, G_STATIC=decay.is_static("g"),
        USE_GK=decay.gk is not None, GK_STATIC=decay.is_static("gk"),
        USE_GV=decay.gv is not None, GV_STATIC=decay.is_static("gv"),
        USE_DT=decay.dt is not None, A_MODE=0 if decay.A is None else (1 if decay.is_static("A") else 2),
    )


def _scan_gates(decay: Decay):
    """(per-token g, gk, gv contiguous or None; static g, gk, gv fp32 floored or None)."""
    per_tok, static = [], []
    for name in ("g", "gk", "gv"):
        x = getattr(decay, name)
        st = decay.is_static(name)
        per_tok.append(x.contiguous() if x is not None and not st else None)
        static.append(x.float().clamp_min(LOG_ZERO).contiguous() if st else None)
    return per_tok, static


def scan_eos(q, k, v, decay: Decay, h0=None, output_final_state=False, cu_seqlens=None):
    """The scan Triton recurrence for any decay (see lcsm/kernels/api.py for the contract)."""
    return ScanEOS.apply(q, k, v, decay.g, decay.gk, decay.gv, decay.dt, decay.A, h0, output_final_state, cu_seqlens)
