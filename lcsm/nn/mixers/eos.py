"""The EOS token mixer: stages -> canonical tensors -> the recurrence -> output norm, gate, projection."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm import kernels, parallel
from lcsm.config.spec import EOSMixer as EOSSpec
from lcsm.kernels.decay import Decay
from lcsm.nn.cache import store, sub
from lcsm.nn.context import LayerContext
from lcsm.nn.head_routing import HeadRouting
from lcsm.nn.fused import gated_norm, gated_norm_linear
from lcsm.nn.norm import make_norm
from lcsm.nn.oscillations import build_oscillation
from lcsm.nn.packing import current as packing
from lcsm.nn.stages.expand import Expand
from lcsm.nn.stages.input import Input
from lcsm.nn.stages.shrink import Shrink
from lcsm.parallel import lasp


class EOSMixer(nn.Module):
    """x [B,T,d] -> [B,T,d] through m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ, y_t = m_tᵀ s_t per head.

    Parameter names are stable (tests and checkpoints read them): input.proj.proj, expand.proj.proj,
    oscillation.*, shrink.proj.proj, out_norm, gate_proj, D, o_proj.
    """

    fixed_state = True  # the decoding state has one size at any context (lcsm.nn.generate may graph it)
    state_grows = False

    def __init__(self, spec: EOSSpec, ctx: LayerContext):
        super().__init__()
        d_model = ctx.d_model
        H, K, V = spec.dims(d_model, ctx.n_heads)
        self.spec, self.H, self.K, self.V = spec, H, K, V
        self.backend = "auto"
        rotated = spec.oscillation.rotates
        self.oscillation = build_oscillation(spec.oscillation, ctx, H, K, V)
        self.input = Input(spec.input, d_model, H, V, spec.bias)
        self.expand = Expand(spec.expand, d_model, H, K, spec.bias, rotated)
        self.shrink = Shrink(spec.shrink, d_model, H, K, spec.bias, rotated)
        out = spec.output
        self.out_norm = None
        if out.norm != "none":
            self.out_norm = make_norm(out.norm, V if out.norm_scope == "head" else H * V, ctx.norm_eps)
        self.gate_proj = None
        if out.gate != "none":
            self.gate_proj = (
                nn.Sequential(nn.Linear(d_model, out.gate_rank, bias=False), nn.Linear(out.gate_rank, H * V, bias=True))
                if out.gate_rank
                else nn.Linear(d_model, H * V, bias=spec.bias)
            )
        self.D = nn.Parameter(torch.ones(H, V)) if out.skip else None
        self.o_proj = nn.Linear(H * V, d_model, bias=spec.bias)
        # attention experts: the read-out of unchosen head groups is zeroed (every memory still updates)
        self.head_routing = HeadRouting(spec.head_routing, d_model, H) if spec.head_routing is not None else None

    @property
    def label(self) -> str:
        return f"eos/{self.spec.oscillation.kind}"

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x [B,T,d] -> [B,T,d]. cache (decoding, see lcsm/nn/cache.py): "state" [B,H,K,V] fp32, the
        absolute position "offset" (a 0-d tensor, for rotations) and the stages' own sub-dicts.
        Packed documents (lcsm/nn/packing.py, x [1,B·T,d]): positions restart and the recurrence
        runs on the varlen kernel, one zero state per document."""
        B, T, _ = x.shape
        sp = parallel.current()  # sequence parallel: x is this rank's slice of the sequence
        pk = packing()
        positions = pk.positions if pk is not None else torch.arange(T, device=x.device) + (sp.offset if sp else 0)
        if cache is not None:
            if "offset" not in cache:
                cache["offset"] = torch.zeros((), dtype=torch.long, device=x.device)
            offset = cache["offset"]
            positions = positions + offset
        osc = self.oscillation(x, positions, sub(cache, "oscillation"))
        i, i_raw = self.input(x, osc, sub(cache, "input"))
        e, decay = osc.with_expand(self.expand(x, osc, sub(cache, "expand")))
        s = self.shrink(x, osc, sub(cache, "shrink"))
        if cache is not None:
            y = self.recur(s, e, i, decay, cache)
            offset.add_(T)  # in place: a captured decoding step advances it on replay
        elif sp is not None and decay.delta:  # LASP-2 with K×K transitions: the exact prefix state, then the slice
            y = lasp.lasp2_delta(s, e, i, decay, sp, backend=self.backend)
        else:
            y, ht = kernels.recurrence(s, e, i, decay, output_final_state=sp is not None,
                                       cu_seqlens=None if pk is None else pk.cu_seqlens, backend=self.backend)
            if sp is not None:  # LASP-2: add the decayed state of the earlier slices
                y = lasp.lasp2(y, ht, s, decay, sp)
        if self.D is not None:
            y = y + self.D.to(y.dtype) * i_raw
        return self.readout(y, x)

    def recur(self, s, e, i, decay: Decay, cache: dict) -> torch.Tensor:
        """The recurrence from cache["state"] (zero when absent), leaving the final state there:
        the one-token step for T = 1, the chunked kernel (prefill) otherwise. Returns y [B,T,H,V]."""
        B, T = s.shape[:2]
        state = cache.get("state")
        if T > 1:
            y, ht = kernels.recurrence(s, e, i, decay, h0=state, output_final_state=True, backend=self.backend)
            store(cache, "state", ht)
            return y
        if state is None:
            state = cache["state"] = s.new_zeros(B, self.H, self.K, self.V, dtype=torch.float32)
        y, new = kernels.step(s[:, 0], e[:, 0], i[:, 0], state, decay.at(0), backend=self.backend)
        store(cache, "state", new)
        return y[:, None]

    def readout(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [B,T,H,V] -> norm, output gate, projection -> [B,T,d]."""
        out = self.spec.output
        if self.out_norm is not None:
            # the norm, the gate if any (and without head routing the output projection) in one
            # function that keeps only its inputs for the backward (lcsm/nn/fused.py)
            norm, g = self.out_norm, None
            if self.gate_proj is not None:
                g = self.gate_proj(x)
                g = g.unflatten(-1, (self.H, self.V)) if out.norm_scope == "head" else g
            args = dict(act=out.gate, gate_first=out.gate_first, bias=getattr(norm, "bias", None), layer=norm.centres)
            yn = y if out.norm_scope == "head" else y.flatten(-2)
            if self.head_routing is None:
                o = gated_norm_linear(yn, norm.weight, g, self.o_proj.weight.to(y.dtype), norm.eps, **args)
                return o if self.o_proj.bias is None else o + self.o_proj.bias.to(o.dtype)
            y = gated_norm(yn, norm.weight, g, norm.eps, **args).view_as(y)
        elif self.gate_proj is not None:  # a gate without a norm
            y = y * (F.silu if out.gate == "silu" else torch.sigmoid)(self.gate_proj(x)).unflatten(-1, (self.H, self.V))
        if self.head_routing is not None:  # after the norm, which would undo the weights
            y = self.head_routing(y, x)
        return self.o_proj(y.flatten(-2))

    def state_size(self) -> int:
        """Numbers held per sequence between tokens: the K×V memories plus short-conv tails."""
        size = self.H * self.K * self.V
        for stage in (self.input.proj, getattr(self.expand, "proj", None), self.shrink.proj):
            conv = getattr(stage, "conv", None)
            if conv is not None:
                size += (conv.size - 1) * stage.H * stage.D
        return size

    def inactive_parameters(self) -> int:
        """With head routing: the parameters of the unchosen groups' read-out (the output
        projection's columns, the query and output-gate rows); 0 without."""
        if self.head_routing is None:
            return 0
        per_head = [self.o_proj]
        query = getattr(self.shrink.proj, "proj", None)  # a data-dependent query: Linear d -> H·K
        if isinstance(query, nn.Linear):
            per_head.append(query)
        gate = self.gate_proj[-1] if isinstance(self.gate_proj, nn.Sequential) else self.gate_proj
        if gate is not None:
            per_head.append(gate)
        return self.head_routing.inactive_of(per_head)

    def flops_per_token(self, context: int = 2048) -> int:
        """Recurrent-form FLOPs per token beyond the matmuls: decay, write (e iᵀ), read (mᵀs) and a
        delta rule's transition."""
        osc = self.oscillation
        return (2 + 2 + int(osc.decays) + osc.transition_flops) * self.H * self.K * self.V
