"""Mixture-of-Memories an EOS mixer whose memories are routed.

Per head there are E routed memories (plus an optional shared one, index E, that sees every token).
A router picks top_k memories per token; a memory not picked at step t is left exactly as it was
(o_t = 1, e_t = 0 for it). The stages named in `routing.per_memory` are built with M·H heads
(M = E + shared) so that every memory has its own projection; the others are shared. Output:

    y_t = Σ_{m ∈ topk(t)} w_t^m · (m_t^m)ᵀ s_t^m  (+ (m_t^shared)ᵀ s_t^shared)

Three paths that agree (tests/nn/test_mom.py):
  dense      M·H heads through one eos_recurrence call, the routing mask folded into e and the log
             gates (a static gate becomes per token); recurrence cost ∝ M.
  sparse     every token copied to its k chosen memories (and the shared one), copies sorted into
             one packed sequence per (memory, batch row), one varlen eos_recurrence call, outputs
             gathered back and weighted; recurrence cost ∝ k + shared. One host sync (segment sizes).
  reference  a plain loop over tokens and memories in fp64, the oracle of the tests.
  auto       sparse on CUDA when B·T >= 4096 and 1.25·(k + shared) < E + shared, else dense.
Under sequence parallelism every path runs dense: the M·H heads go through LASP-2 (lcsm.parallel.lasp)
with the masked decay, since an unchosen memory is one whose decay is 1 at that token (delta
memories through lasp2_delta: an unchosen memory's transition is the identity); the sparse path's
packed copies have no per-rank prefix state to hand on.
Per-memory projections: dense and reference compute them for every token and memory; sparse
projects only the copies (x gathered in memory order, one matmul per memory on its rows), except
for a stage with a short convolution, which needs its neighbours in the original sequence and is
computed for every token as in dense. Every path computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lcsm import kernels, parallel
from lcsm.config.spec import EOSMixer as EOSSpec
from lcsm.kernels.decay import Decay
from lcsm.nn.cache import store
from lcsm.nn.context import LayerContext
from lcsm.nn.mixers.eos import EOSMixer
from lcsm.nn.oscillations import build_oscillation
from lcsm.nn.packing import current as packing
from lcsm.nn.routing import Routed, Router, RoutingStats
from lcsm.nn.stages.common import ShortConv
from lcsm.nn.stages.expand import Expand
from lcsm.nn.stages.input import Input
from lcsm.nn.stages.shrink import Shrink
from lcsm.parallel import lasp

AUTO_MIN_TOKENS = 4096


def mix_memories(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_c w[b,t,c] · y[b,t,c]: y [B,T,C,H,V] (one read-out per memory or copy), w [B,T,C] -> [B,T,H,V].

    A broadcast product and sum, not an einsum: the einsum is a batched matmul over B·T tiny
    [H·V, C] × [C, 1] products, which CUDA runs on a slow small-GEMM kernel (a 4.7 ms fp32
    `magma_sgemmEx` per forward+backward of both MoM paths at 8×4096 on the H200 is the likely
    one: docs/benchmarks.md, sixth session), where the sum is a pass over y."""
    return (y * w.to(y.dtype)[..., None, None]).sum(2)


@dataclass
class Stream:
    """One canonical tensor with its memory layout.

    x: per token [B,T,Hx,*rest] or static [Hx,*rest], Hx = M·H (per_memory, memory-major) or H.
    The decay's tensors go through the same layouts (Decay.map tells which are static)."""

    x: torch.Tensor
    per_memory: bool
    static: bool

    def dense(self, B: int, T: int, M: int, H: int) -> torch.Tensor:
        """[B,T,M,H,*rest] (a view where possible)."""
        x = self.x
        if self.static:
            rest = x.shape[1:]
            x = x.view(M, H, *rest) if self.per_memory else x[None].expand(M, H, *rest)
            return x.expand(B, T, M, H, *rest)
        rest = x.shape[3:]
        return x.view(B, T, M, H, *rest) if self.per_memory else x[:, :, None].expand(B, T, M, H, *rest)

    def gather(self, tok: torch.Tensor, mem: torch.Tensor, M: int, H: int) -> torch.Tensor:
        """The copies (token tok[n], memory mem[n]) as one packed sequence [1,N,H,*rest];
        a static gate shared by all memories stays static."""
        x = self.x
        if self.static:
            # a static gate shared by all memories works unchanged on the packed copies
            return x.view(M, H, *x.shape[1:])[mem][None] if self.per_memory else x
        rest = x.shape[3:]
        if self.per_memory:
            return x.reshape(-1, H, *rest)[tok * M + mem][None]
        return x.reshape(-1, H, *rest)[tok][None]


@dataclass
class Packed:
    """A stream already computed for the packed copies: [1,N,H,D]."""

    x: torch.Tensor

    def gather(self, tok, mem, M, H) -> torch.Tensor:
        return self.x


class MoMMixer(EOSMixer):
    """x [B,T,d] -> [B,T,d]: an EOS mixer with routed memories (spec.routing).

    Parameter names extend the EOS mixer's: router.proj, and the per-memory stages keep their
    names with M·H heads (memory-major: head h of memory m is column block m·H + h).
    """

    def __init__(self, spec: EOSSpec, ctx: LayerContext):
        super().__init__(spec, ctx)
        d_model = ctx.d_model
        r = spec.routing
        self.E, self.top_k, self.shared = r.memories, r.top_k, r.shared
        self.M = self.E + int(r.shared)
        self.per_memory = frozenset(r.per_memory)
        self.path = r.path
        self.aux_weight = r.aux_loss_weight
        K, V, MH = self.K, self.V, self.M * self.H
        if "oscillation" in self.per_memory:
            self.oscillation = build_oscillation(spec.oscillation, ctx, MH, K, V)
        if "input" in self.per_memory:
            self.input = Input(spec.input, d_model, MH, V, spec.bias)
        if "expand" in self.per_memory:
            self.expand = Expand(spec.expand, d_model, MH, K, spec.bias, False)
        if "shrink" in self.per_memory:
            self.shrink = Shrink(spec.shrink, d_model, MH, K, spec.bias, False)
        self.router = Router(d_model, self.E, self.top_k)
        self.conv_tail = max((m.size - 1 for m in self.modules() if isinstance(m, ShortConv)), default=0)
        # per-memory projections without a convolution: the sparse path projects only the copies (not
        # a delta rule's expand: its key is also the removal key of the decay, computed with the stages)
        self.deferred = tuple(
            n for n in ("input", "expand", "shrink")
            if n in self.per_memory and getattr(self, n).proj.source == "data" and getattr(self, n).proj.conv is None
            and not (n == "expand" and spec.oscillation.transition)
        )
        self.aux_scope = r.aux_loss_scope
        self.routing_stats = None
        self.aux_stats = None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x [B,T,d]; cache (optional, one dict per layer): {"state": [B,M,H,K,V], "x_tail": [B,<=c-1,d]}."""
        B, T, _ = x.shape
        tail = cache.get("x_tail") if cache is not None else None
        xs = x if tail is None else torch.cat([tail, x], dim=1)
        path = self.choose_path(x)
        streams, decay = self.streams(xs, skip=xs.shape[1] - T, deferred=self.deferred if path == "sparse" else ())
        routed = self.router(x)
        self.set_aux(routed)
        h0 = None if cache is None else cache.get("state")
        if path == "dense":
            y, ht = self.run_dense(streams, decay, routed, B, T, h0, cache is not None, parallel.current())
        elif path == "sparse":
            y, ht = self.run_sparse(streams, decay, routed, B, T, h0, cache is not None, x)
        else:
            y, ht = self.run_reference(streams, decay, routed, B, T, h0)
        if cache is not None:
            # in place where the shapes agree: a captured decoding step replays on the same buffers
            store(cache, "state", ht)
            if self.conv_tail:
                store(cache, "x_tail", xs[:, -self.conv_tail :])
        return self.readout(y, x)

    def choose_path(self, x: torch.Tensor) -> str:
        if parallel.current() is not None:
            return "dense"  # sequence parallel: LASP-2 over the M·H heads (the module docstring)
        if torch.compiler.is_compiling() and self.path != "reference":
            return "dense"  # the sparse path sizes its segments on the host: no static graph
        if self.path != "auto":
            return self.path
        B, T, _ = x.shape
        copies = self.top_k + int(self.shared)
        if x.is_cuda and B * T >= AUTO_MIN_TOKENS and 1.25 * copies < self.M:
            return "sparse"
        return "dense"

    def streams(self, x: torch.Tensor, skip: int, deferred=()) -> tuple[dict[str, Stream], Decay]:
        """Run the stages on x [B,T',d]; drop the first `skip` tokens (the cached conv context).
        Stages named in `deferred` are left out (the sparse path projects the copies itself).
        Returns the s, e, i streams and the decay (its tensors in the layout of `oscillation`)."""
        pk, sp = packing(), parallel.current()  # sequence parallel: rotations need the global positions
        positions = pk.positions if pk is not None else torch.arange(x.shape[1], device=x.device) + (sp.offset if sp else 0)
        osc = self.oscillation(x, positions)
        decay = osc.decay
        out = {}
        for name, short in (("shrink", "s"), ("expand", "e"), ("input", "i")):
            if name not in deferred:
                t = getattr(self, name)(x, osc)
                t = t[0] if name == "input" else t
                if name == "expand":  # a delta rule's removal key is the expand key (one layout: the spec checks it)
                    t, decay = osc.with_expand(t)
                out[short] = Stream(t[:, skip:], name in self.per_memory, False)
        return out, decay.slice(skip, None)

    def decay_layout(self, decay: Decay, layout) -> Decay:
        """The decay's tensors through a Stream layout: layout(stream) -> tensor."""
        per_memory = "oscillation" in self.per_memory
        return decay.map(lambda x, static: layout(Stream(x, per_memory, static)))

    @staticmethod
    def same_key(decay: Decay, e: torch.Tensor) -> Decay:
        """A delta decay with beta whose removal key w is the expand key, laid out (and masked) as e
        [.., H, K] was: w = e itself, so the recurrence takes fla's form (lcsm/kernels/decay.py)."""
        return replace(decay, w=e) if decay.beta is not None else decay

    def set_aux(self, routed: Routed) -> None:
        stats = RoutingStats.of(routed, self.E, self.aux_weight, self.aux_scope)
        self.routing_stats = stats if self.aux_weight > 0 else None
        # tensors, not floats: no host sync per step; Model.aux_stats() converts at logging time
        load = stats.load()
        self.aux_stats = {"balance": stats.loss().detach(), **{f"load_{m}": load[m].detach() for m in range(self.E)}}

    def memory_weights(self, routed: Routed) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,T,M] weights (0 where not chosen, 1 for the shared memory) and the bool mask."""
        w, mask = routed.dense_weights(self.E), routed.mask(self.E)
        if self.shared:
            w = torch.cat([w, torch.ones_like(w[..., :1])], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)
        return w, mask

    # ------------------------------------------------------------------ dense

    def run_dense(self, st: dict[str, Stream], decay: Decay, routed: Routed, B: int, T: int, h0, want_state: bool,
                  sp: parallel.SequenceParallel | None = None):
        """M·H heads, one call: unchosen memories get e = 0 and log o = 0 at that token. sp: this
        rank's slice of a split sequence; LASP-2 adds the earlier slices' memories, per memory."""
        M, H, K, V = self.M, self.H, self.K, self.V
        w, mask = self.memory_weights(routed)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, M * H, *t.shape[4:])

        s = heads(st["s"].dense(B, T, M, H))
        e = heads(st["e"].dense(B, T, M, H) * mask[..., None, None].to(st["e"].x.dtype))
        i = heads(st["i"].dense(B, T, M, H))
        # an unchosen memory's transition is the identity at that token (o = 1; its e is 0 above)
        keep = mask[..., None].expand(B, T, M, H).reshape(B, T, M * H)
        decay = self.decay_layout(decay, lambda stream: heads(stream.dense(B, T, M, H))).masked(keep)
        decay = self.same_key(decay, e)
        if h0 is not None:
            h0 = h0.reshape(B, M * H, K, V)
        if sp is not None and decay.delta:  # delta memories: K×K transitions, the exact entering state, then the slice
            y, ht = lasp.lasp2_delta(s, e, i, decay, sp, backend=self.backend), None
        else:
            pk = packing()  # packed documents: every memory starts from zero per document (varlen kernel; not under SP)
            y, ht = kernels.recurrence(s, e, i, decay, h0=h0, output_final_state=want_state or sp is not None,
                                       cu_seqlens=None if pk is None else pk.cu_seqlens, backend=self.backend)
            if sp is not None:
                y = lasp.lasp2(y, ht, s, decay, sp)
                ht = ht if want_state else None
        y = mix_memories(y.view(B, T, M, H, V), w)
        return y, (None if ht is None else ht.view(B, M, H, K, V))

    # ------------------------------------------------------------------ sparse

    def run_sparse(self, st: dict[str, Stream], decay: Decay, routed: Routed, B: int, T: int, h0, want_state: bool, x: torch.Tensor):
        """Copies sorted by (memory, batch row, time) into one packed sequence per (memory, row);
        with packed documents (B = 1) the rows are the documents."""
        M, H, K, V = self.M, self.H, self.K, self.V
        dev = routed.index.device
        pk = packing()
        # R sequences of the batch: the rows, or the packed documents (each token's index in row_of)
        R, row_of = (B, None) if pk is None else (pk.n, pk.doc)
        mem = routed.index
        w = routed.weights
        if self.shared:
            mem = torch.cat([mem, torch.full_like(mem[..., :1], self.E)], dim=-1)
            w = torch.cat([w, torch.ones_like(w[..., :1])], dim=-1)
        C = mem.shape[-1]  # copies per token
        tok = torch.arange(B * T, device=dev).repeat_interleave(C)  # b·T + t of each copy
        mem = mem.reshape(-1)
        # keys are distinct, so the sort groups (memory, row) and keeps time order inside a group
        order = torch.argsort(mem * (B * T) + tok)
        tok_s, mem_s = tok[order], mem[order]
        seg = mem * R + (tok // T if row_of is None else row_of[tok])
        counts = torch.bincount(seg, minlength=M * R).tolist()  # the one host sync: segment sizes
        segs = [n for n, c in enumerate(counts) if c > 0]
        bounds = [0]
        for n in segs:
            bounds.append(bounds[-1] + counts[n])
        cu = torch.tensor(bounds, device=dev, dtype=torch.int32)
        seg_t = torch.tensor(segs, device=dev, dtype=torch.long)
        seg_m, seg_b = seg_t // R, seg_t % R
        if self.deferred:
            per_memory = [sum(counts[m * R : (m + 1) * R]) for m in range(M)]
            xc = x.reshape(B * T, -1)[tok_s]  # [N,d], grouped by memory
            st = dict(st)
            for name in self.deferred:
                st[{"shrink": "s", "expand": "e", "input": "i"}[name]] = Packed(self.project_copies(getattr(self, name).proj, xc, per_memory))

        s, e, i = (st[n].gather(tok_s, mem_s, M, H) for n in ("s", "e", "i"))
        decay = self.same_key(self.decay_layout(decay, lambda stream: stream.gather(tok_s, mem_s, M, H)), e)
        if want_state and h0 is None:
            h0 = torch.zeros(B, M, H, K, V, device=dev, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
        h0_seg = None if h0 is None else h0[seg_b, seg_m]
        y, ht = kernels.recurrence(s, e, i, decay, h0=h0_seg, output_final_state=want_state, cu_seqlens=cu, backend=self.backend)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=dev)
        y = y[0][inverse].view(B, T, C, H, V)
        y = mix_memories(y, w)
        if not want_state:
            return y, None
        # memories no token of a row chose keep their state: index_put only the visited segments
        return y, h0.index_put((seg_b, seg_m), ht.to(h0.dtype))

    def project_copies(self, proj, xc: torch.Tensor, per_memory: list[int]) -> torch.Tensor:
        """A per-memory Projection (data, no conv) of the copies xc [N,d] grouped by memory ->
        [1,N,H,D]: each memory's block of the weight on its own rows (one matmul per memory;
        no gather can replace the matmuls, and the sizes are known on the host already)."""
        M, H = self.M, self.H
        W = proj.proj.weight.view(M, -1, proj.proj.weight.shape[-1])
        b = None if proj.proj.bias is None else proj.proj.bias.view(M, -1)
        # split, not slices: a slice's backward writes its gradient into a zero tensor of all N
        # rows and autograd then adds those up, an [N, d] fill and add per memory and projection
        # (on the H200 most of the sparse path's copies: docs/benchmarks.md, sixth session);
        # split's backward is one concatenation
        parts = [F.linear(rows, W[m], None if b is None else b[m])
                 for m, rows in enumerate(xc.split(per_memory)) if per_memory[m]]
        return proj.finish(proj.feature_map(torch.cat(parts)).view(1, -1, H, proj.D))

    # ------------------------------------------------------------------ reference

    def run_reference(self, st: dict[str, Stream], decay: Decay, routed: Routed, B: int, T: int, h0):
        """A plain loop over tokens and memories in fp64 (the oracle)."""
        M, H, K, V = self.M, self.H, self.K, self.V
        f64 = torch.float64
        weight, mask = self.memory_weights(routed)
        weight = weight.to(f64)
        s, e, i = (st[n].dense(B, T, M, H).to(f64) for n in ("s", "e", "i"))
        decay = self.decay_layout(decay, lambda stream: stream.dense(B, T, M, H).flatten(2, 3).to(f64))
        if decay.beta is not None:  # the write key β·w formed: the loop below writes and reads with e
            e, decay = e * decay.beta.unflatten(2, (M, H))[..., None], replace(decay, beta=None)
        removal = None if decay.w is None else decay.w.unflatten(2, (M, H))  # [B,T,M,H,K]: a delta rule's keys
        zero = torch.zeros(B, H, K, V, dtype=f64, device=s.device)
        states = [zero if h0 is None else h0[:, m].to(f64) for m in range(M)]
        pk = packing()
        ys = []
        for t in range(T):
            if pk is not None and int(pk.positions[t]) == 0:  # a packed document starts: empty memories
                states = [zero] * M
            y_t = torch.zeros(B, H, V, dtype=f64, device=s.device)
            log_o = decay.log_step(t, f64)  # [B, M·H, K|1, V|1], or None for o = 1
            o = None if log_o is None else torch.exp(log_o).unflatten(1, (M, H))
            for m in range(M):
                new = states[m] if o is None else o[:, m] * states[m]
                if removal is not None:  # (I − w eᵀ) on the decayed state
                    read = torch.einsum("bhk,bhkv->bhv", e[:, t, m], new)
                    new = new - removal[:, t, m, :, :, None] * read[:, :, None, :]
                new = new + e[:, t, m, :, :, None] * i[:, t, m, :, None, :]
                states[m] = torch.where(mask[:, t, m, None, None, None], new, states[m])
                y_t = y_t + weight[:, t, m, None, None] * torch.einsum("bhkv,bhk->bhv", states[m], s[:, t, m])
            ys.append(y_t)
        y = torch.stack(ys, dim=1).to(st["s"].x.dtype)
        state_dtype = f64 if st["s"].x.dtype == f64 else torch.float32
        return y, torch.stack(states, dim=1).to(state_dtype)

    # ------------------------------------------------------------------ summary

    def state_size(self) -> int:
        """What decoding keeps (the cache): the M memories per head, plus the last conv - 1 inputs
        [conv - 1, d_model] from which the convolved stages are recomputed."""
        d_model = self.o_proj.out_features
        return self.M * self.H * self.K * self.V + self.conv_tail * d_model

    def flops_per_token(self, context: int = 2048) -> int:
        """Each token decays, writes and reads k memories (plus the shared one)."""
        return super().flops_per_token(context) * (self.top_k + int(self.shared))
