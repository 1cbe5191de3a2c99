"""The segment split of the chunked state passes (`LCSM_STATE_SEGMENTS`, docs/kernels.md).

Why: `chunk_state_fwd_kernel` and `chunk_state_bwd_kernel` run one program per (sequence, head,
K tile, V tile) and walk all chunks of a sequence in order. With few (sequence, head) pairs and
long sequences the GPU is mostly idle: GLA at 1×32768 tokens with 8 heads spends 18.7 ms (forward,
24 launches) + 10.1 ms (backward) of its 143.7 ms device time per step in these two kernels, 8
pairs walking 512 chunks each (docs/benchmarks.md, "The split K-decay backward and the state-kernel
tiles, profiled in the model"); larger or smaller tiles did not help.

The state recurrence across chunks is affine, h_{c+1} = D_c ⊙ h_c + U_c, so every sequence is cut
into segments of S chunks (S·64 tokens; the last one of a sequence may be shorter):

1. local states: the existing state kernel on a packed layout whose sequences are the segments,
   from a zero state, storing each segment's final local state (parallel over segments). Segment
   lengths are multiples of the chunk, so the chunks of that layout are the original chunks in the
   original order (the h buffer is indexed alike) and the gates' chunk-local cumsums stay valid;
2. carry (this module, torch, sequential over the few segments of a sequence):
   s_0 = h0 (or 0), s_{j+1} = Dseg_j ⊙ s_j + ht_local_j; the last carry is the final state;
3. correct: h[c] += exp(Λ_c) ⊙ s_{seg(c)}, Λ_c the log decay from the segment's start to chunk c.

The backward's dh is the same in reverse (local dh per segment from a zero dht, the gradient of each
segment's end state carried back through the segment decays, then dh[c] += exp(Λ'_c) ⊙ that, Λ'_c
the log decay from the end of chunk c to the segment's end); dh0 is the last carry.

This module holds the bookkeeping and the torch passes 2 and 3; the kernel launches are in
autograd.py. Measured not to pay (GLA at 1×32768: 0.98× the tokens/s, docs/kernels.md): off
unless LCSM_STATE_SEGMENTS is set.
"""

from __future__ import annotations

import functools

import torch

from .chunk import BT

ENV = "LCSM_STATE_SEGMENTS"
# auto: no split at this many (sequence, head) pairs or more, nor below this many chunks in the
# longest sequence; otherwise aim at about AUTO_PROGRAMS programs per (K, V) tile, segments of at
# least AUTO_MIN_CHUNKS chunks
AUTO_MAX_PAIRS = 64
AUTO_MIN_WALK = 64
AUTO_PROGRAMS = 128
AUTO_MIN_CHUNKS = 8


def parse_setting(value: str | None) -> None | str | int:
    """LCSM_STATE_SEGMENTS: unset, empty or "off" -> None (no split); "auto" -> "auto"; a positive
    integer -> that many chunks per segment. Anything else raises ValueError."""
    if value is None or value.strip().lower() in ("", "off"):
        return None
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={value!r}: expected 'off' (the default), 'auto', or a positive integer "
                         "(chunks of 64 tokens per segment)")
    return n


def chunks_per_segment(setting: None | str | int, n_seq: int, H: int, max_chunks: int) -> int | None:
    """The segment length S in chunks for n_seq sequences of H heads whose longest has max_chunks
    chunks, or None for no split (the setting is off, auto finds the grid large or the walk short,
    or a single segment would cover every sequence).

    auto: none when n_seq·H >= AUTO_MAX_PAIRS or max_chunks < AUTO_MIN_WALK; else
    AUTO_PROGRAMS // (n_seq·H) segments per sequence (so n_seq·H·segments is about 64–128
    programs per tile), each of at least AUTO_MIN_CHUNKS chunks."""
    if setting is None:
        return None
    if setting == "auto":
        pairs = n_seq * H
        if pairs >= AUTO_MAX_PAIRS or max_chunks < AUTO_MIN_WALK:
            return None
        per_seq = max(2, AUTO_PROGRAMS // pairs)
        S = max(AUTO_MIN_CHUNKS, -(-max_chunks // per_seq))
    else:
        S = int(setting)
    return S if S < max_chunks else None


class SegmentPlan:
    """The segments of a batch: a packed layout over the flattened tokens whose sequences are the
    segments (what the state kernels read: `N`, `cu`, `chunk_off`, `n_chunks`, `varlen`), and the
    maps between chunks, segments and sequences that the torch passes use.

    Built on the host from the sequences' token offsets and lengths (`starts`, `lens` [N] int64,
    CPU): segment j of sequence n covers tokens starts[n] + j·S·64 ... (+ S·64, or the sequence's
    end). A contiguous [B,T,H,K] batch is the packed batch of B sequences of T tokens over its
    flattened [1, B·T] view (starts = b·T), which is how the varlen kernels index tokens.

    Fields (device tensors, int64 unless said):
      N [int]          the number of segments n_seg (the kernels' "sequences")
      cu               [n_seg + 1] int32: token offsets of the segments
      chunk_off        [n_seg + 1] int32: first chunk of every segment (= its original chunk id)
      n_seq, J, S      sequences, most segments in one sequence, chunks per (full) segment
      seg_slot         [n_seg]: n·J + j, the segment's place in a padded [n_seq, J] grid
      chunk_seg        [n_chunks]: the segment of every chunk;  chunk_pos: its place in it
      chunk_last       [n_chunks]: flattened token index of every chunk's last token
      chunk_len        [n_chunks] fp32: its number of tokens
      regular [bool]   every segment has S chunks (chunk c is segment c // S, place c % S)
    """

    varlen = True

    def __init__(self, starts: torch.Tensor, lens: torch.Tensor, S: int, device):
        starts, lens = starts.long().cpu(), lens.long().cpu()
        n_seq = lens.numel()
        chunks = (lens + BT - 1) // BT
        nseg = (chunks + S - 1) // S
        self.n_seq, self.S = n_seq, S
        self.J = int(nseg.max()) if n_seq else 0
        n_seg = int(nseg.sum())
        seq = torch.repeat_interleave(torch.arange(n_seq), nseg)
        j = torch.arange(n_seg) - (torch.cumsum(nseg, 0) - nseg)[seq]
        seg_start = starts[seq] + j * (S * BT)
        seg_len = torch.clamp(lens[seq] - j * (S * BT), max=S * BT)
        seg_chunks = (seg_len + BT - 1) // BT
        end = seg_start[-1:] + seg_len[-1:] if n_seg else starts[:1]
        cu = torch.cat([seg_start, end])
        chunk_off = torch.cat([seg_chunks.new_zeros(1), torch.cumsum(seg_chunks, 0)])
        self.N, self.n_chunks = n_seg, int(seg_chunks.sum())
        chunk_seg = torch.repeat_interleave(torch.arange(n_seg), seg_chunks)
        chunk_pos = torch.arange(self.n_chunks) - chunk_off[:-1][chunk_seg]
        clen = torch.clamp(seg_len[chunk_seg] - chunk_pos * BT, max=BT)
        chunk_last = seg_start[chunk_seg] + chunk_pos * BT + clen - 1
        self.regular = bool((seg_chunks == S).all())
        to = functools.partial(torch.Tensor.to, device=device)
        self.cu, self.chunk_off = to(cu.to(torch.int32)), to(chunk_off.to(torch.int32))
        self.seg_slot = to(seq * self.J + j)
        self.chunk_seg, self.chunk_pos, self.chunk_last = to(chunk_seg), to(chunk_pos), to(chunk_last)
        self.chunk_len = to(clen.float())


@functools.lru_cache(maxsize=32)
def _batch_plan(B: int, T: int, S: int, device: torch.device) -> SegmentPlan:
    # a [B,T] batch's plan depends only on its shape: built once per shape (host overhead matters)
    return SegmentPlan(torch.arange(B) * T, torch.full((B,), T), S, device)


def plan(setting: None | str | int, B: int, T: int, H: int, cu_seqlens: torch.Tensor | None, device) -> SegmentPlan | None:
    """The segment plan of a call ([B,T] tokens, or packed sequences cu_seqlens with B = 1), or
    None for the unsplit path. With packed sequences this reads cu_seqlens on the host (one sync)."""
    if setting is None:
        return None
    if cu_seqlens is None:
        S = chunks_per_segment(setting, B, H, -(-T // BT))
        return None if S is None else _batch_plan(B, T, S, torch.device(device))
    n_seq = cu_seqlens.numel() - 1
    if setting == "auto" and n_seq * H >= AUTO_MAX_PAIRS:
        return None  # decided without reading the lengths
    cu = cu_seqlens.detach().long().cpu()
    lens = cu[1:] - cu[:-1]
    max_chunks = int((lens.max() + BT - 1) // BT) if n_seq else 0
    S = chunks_per_segment(setting, n_seq, H, max_chunks)
    return None if S is None else SegmentPlan(cu[:-1], lens, S, device)


# --------------------------------------------------------------------------- decays


def _exclusive(P: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Exclusive cumsum along dim 1 (from the end with reverse): sums, never differences of sums,
    so a huge decay (a hard reset, LOG_ZERO per token) costs no precision in the others."""
    out = torch.zeros_like(P)
    if reverse:
        out[:, :-1] = P[:, 1:].flip(1).cumsum(1).flip(1)
    else:
        out[:, 1:] = P[:, :-1].cumsum(1)
    return out


class SegmentDecays:
    """The log decays of a call's chunks, as a part along K and a part along V (the decay of a
    chunk is exp(a)[:, None] ⊙ exp(b)[None, :], both factors <= 1):

      pre_k, pre_v    [n_chunks, H, Kd], [n_chunks, H, Vd]: from the segment's start to the chunk's start
      post_k, post_v  the same from the chunk's end to the segment's end
      seg_k, seg_v    [n_seg, H, Kd], [n_seg, H, Vd]: the whole segment

    Kd is K with a decay along K (the scalar gate folded in) else 1; Vd is V with one along V else 1.
    A chunk's total is the last row of its inclusive cumsum (`Gates.cum`, as the kernel reads it), or
    (chunk length)·g for a static gate (`Gates.stat`, floored)."""

    def __init__(self, gates, plan: SegmentPlan, H: int, device):
        parts = {"k": None, "v": None}
        for name, side in (("g", "k"), ("gk", "k"), ("gv", "v")):
            if not gates.use[name]:
                continue
            if gates.static[name]:
                stat = gates.stat[name]  # [H] or [H, D]
                tot = plan.chunk_len.view(-1, *([1] * stat.dim())) * stat
            else:
                cum = gates.cum[name]  # [B,T,H] or [B,T,H,D] fp32
                tot = cum.reshape(-1, *cum.shape[2:])[plan.chunk_last]
            if tot.dim() == 2:
                tot = tot.unsqueeze(-1)  # a scalar gate: [n_chunks, H, 1]
            parts[side] = tot if parts[side] is None else parts[side] + tot
        zero = torch.zeros(plan.n_chunks, H, 1, dtype=torch.float32, device=device)
        for side in ("k", "v"):
            tot = (parts[side] if parts[side] is not None else zero).float()
            if plan.regular:
                P = tot.view(plan.N, plan.S, *tot.shape[1:])
            else:
                P = tot.new_zeros(plan.N, plan.S, *tot.shape[1:])
                P[plan.chunk_seg, plan.chunk_pos] = tot
            pre, post = _exclusive(P, False), _exclusive(P, True)
            if plan.regular:
                pre, post = pre.flatten(0, 1), post.flatten(0, 1)
            else:
                pre, post = pre[plan.chunk_seg, plan.chunk_pos], post[plan.chunk_seg, plan.chunk_pos]
            setattr(self, f"pre_{side}", pre)
            setattr(self, f"post_{side}", post)
            setattr(self, f"seg_{side}", P.sum(1))


def _outer_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a)[..., :, None] * exp(b)[..., None, :]: [.., Kd, Vd]."""
    return torch.exp(a).unsqueeze(-1) * torch.exp(b).unsqueeze(-2)


# --------------------------------------------------------------------------- carry and correct


def _carry(plan: SegmentPlan, dec: SegmentDecays, local: torch.Tensor, init: torch.Tensor | None,
           N: int, reverse: bool):
    """x_{j+1} = Dseg_j ⊙ x_j + local_j over the segments j of every sequence (j descending with
    reverse), from init (or 0). local [n_seg, H, K, V] fp32. Returns (x before every segment's step
    [n_seg, H, K, V], the last x [N, H, K, V])."""
    _, H, K, V = local.shape
    slots = plan.n_seq * plan.J
    pad = local.new_zeros(slots, H, K, V)
    pad[plan.seg_slot] = local
    pad = pad.view(plan.n_seq, plan.J, H, K, V)
    seg_k = local.new_zeros(slots, *dec.seg_k.shape[1:])
    seg_v = local.new_zeros(slots, *dec.seg_v.shape[1:])
    seg_k[plan.seg_slot], seg_v[plan.seg_slot] = dec.seg_k, dec.seg_v  # padding: decay 1, local 0
    D = _outer_exp(seg_k, seg_v).view(plan.n_seq, plan.J, H, seg_k.shape[-1], seg_v.shape[-1])
    x = init.float().clone() if init is not None else local.new_zeros(N, H, K, V)
    before = [None] * plan.J
    for j in (reversed(range(plan.J)) if reverse else range(plan.J)):
        before[j] = x
        x = torch.addcmul(pad[:, j], D[:, j], x)
    if plan.J == 0:
        return local.new_zeros(0, H, K, V), x
    return torch.stack(before, 1).view(slots, H, K, V)[plan.seg_slot], x


def _correct(x: torch.Tensor, plan: SegmentPlan, w_k: torch.Tensor, w_v: torch.Tensor, per_seg: torch.Tensor):
    """x[c] += exp(w_k[c]) ⊗ exp(w_v[c]) ⊙ per_seg[seg(c)], in fp32, cast once into x's dtype (in place)."""
    w = _outer_exp(w_k, w_v)  # [n_chunks, H, Kd, Vd]
    xf = x if x.dtype == torch.float32 else x.float()
    if plan.regular:  # chunk c is segment c // S: broadcast, no gather
        _, H, K, V = x.shape
        xf.view(plan.N, plan.S, H, K, V).addcmul_(w.view(plan.N, plan.S, *w.shape[1:]), per_seg.unsqueeze(1))
    else:
        xf.addcmul_(w, per_seg[plan.chunk_seg])
    if xf is not x:
        x.copy_(xf)
    return x


def fix_states(h: torch.Tensor, ht_local: torch.Tensor, plan: SegmentPlan, dec: SegmentDecays,
               h0: torch.Tensor | None, N: int):
    """Passes 2 and 3 of the forward. h [n_chunks, H, K, V] (fp32, or bf16/fp16 for such inputs):
    the local states before every chunk, from zero at every segment's start; ht_local [n_seg, H, K, V]
    fp32: every segment's final local state; h0 [N, H, K, V] fp32 or None. Corrects h in place into
    the true states and returns (h, ht [N, H, K, V] fp32: every sequence's final state)."""
    start, ht = _carry(plan, dec, ht_local, h0, N, reverse=False)
    return _correct(h, plan, dec.pre_k, dec.pre_v, start), ht


def fix_state_grads(dh: torch.Tensor, dh0_local: torch.Tensor, plan: SegmentPlan, dec: SegmentDecays,
                    dht: torch.Tensor | None, N: int):
    """The same for the backward. dh [n_chunks, H, K, V]: ∂L/∂(state after chunk c) through the
    chunks of c's segment only (the state kernel's reverse walk from a zero gradient at every
    segment's end); dh0_local [n_seg, H, K, V] fp32: the same for every segment's start state;
    dht [N, H, K, V] fp32 or None. Corrects dh in place and returns (dh, dh0 [N, H, K, V] fp32)."""
    end, dh0 = _carry(plan, dec, dh0_local, dht, N, reverse=True)
    return _correct(dh, plan, dec.post_k, dec.post_v, end), dh0
