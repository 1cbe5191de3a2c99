"""Causal softmax attention (the baseline token mixer, and the attention layers of hybrids)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lcsm import parallel
from lcsm.config.spec import AttentionMixer as AttentionSpec
from lcsm.nn.context import LayerContext
from lcsm.nn.head_routing import HeadRouting
from lcsm.nn.packing import current as packing
from lcsm.parallel import lasp


DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rope(x: torch.Tensor, base: float, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding on [B,T,H,D] (rotate-half convention), positions start..start+T-1,
    or the given positions [B,T] (packed documents: each restarts at 0)."""
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    if positions is None:
        positions = torch.arange(start, start + T, device=x.device)
    ang = positions.to(torch.float64)[..., None] * inv  # [T, D/2] or [B, T, D/2]
    cos, sin = torch.cos(ang).to(x.dtype)[..., None, :], torch.sin(ang).to(x.dtype)[..., None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionMixer(nn.Module):
    """Causal softmax attention through torch's scaled_dot_product_attention."""

    fixed_state = False  # the KV cache grows with the context
    state_grows = True
    label = "attention"

    def __init__(self, spec: AttentionSpec, ctx: LayerContext):
        super().__init__()
        d_model = ctx.d_model
        self.spec = spec
        self.H = spec.heads or ctx.n_heads
        self.Dh = d_model // self.H
        self.q_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        # attention experts: unchosen head groups' outputs are zeroed (their K, V are still cached)
        self.head_routing = HeadRouting(spec.head_routing, d_model, self.H) if spec.head_routing is not None else None

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x [B,T,d] -> [B,T,d]. cache (decoding): the KV cache "k", "v" [B,H,capacity,Dh] and the
        context length "len"; "max_len", when the caller sets it, sizes the buffers once."""
        pk = packing()
        if pk is not None:
            return self.packed(x, pk)
        start = 0 if cache is None else cache.get("len", 0)
        q, k, v = (p(x).unflatten(-1, (self.H, self.Dh)) for p in (self.q_proj, self.k_proj, self.v_proj))
        sp = parallel.current()
        if self.spec.position == "rope":
            offset = start + (sp.offset if sp else 0)
            q, k = rope(q, self.spec.rope_base, offset), rope(k, self.spec.rope_base, offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            keys, values = self.append(cache, k, v)
            if start > 0:  # attend to the whole context: no mask for one query, else causal from `start`
                T, L = q.shape[2], keys.shape[2]
                mask = None if T == 1 else torch.arange(L, device=x.device) <= torch.arange(start, L, device=x.device)[:, None]
                # the context grows by one every step: SDPA's default choice (most likely cuDNN,
                # planning anew for each key length) cost 84 ms/token on an H200, these 11 ms
                with sdpa_kernel(DECODE_BACKENDS):
                    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
                return self.readout(y, x)
        if sp is not None:  # LASP-2H: all-gather K and V along the sequence
            y = lasp.attention(q, k, v, sp)
        else:  # no context before these tokens: plain causal attention (FlashAttention for a long prefill)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.readout(y, x)

    def readout(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [B,H,T,Dh] -> (head routing) -> output projection -> [B,T,d]."""
        y = y.transpose(1, 2)
        if self.head_routing is not None:
            y = self.head_routing(y, x)
        return self.o_proj(y.flatten(-2))

    def packed(self, x: torch.Tensor, pk) -> torch.Tensor:
        """Packed documents, x [1,B·T,d]: attention per row again (the rows are separate), a query
        seeing the keys of its own document only (a block-diagonal causal mask), positions restarting."""
        B, T = pk.rows
        x = x.view(B, T, -1)
        q, k, v = (p(x).unflatten(-1, (self.H, self.Dh)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.spec.position == "rope":
            positions = pk.positions.view(B, T)
            q, k = rope(q, self.spec.rope_base, positions=positions), rope(k, self.spec.rope_base, positions=positions)
        doc = pk.doc.view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B,T,T]; the diagonal: never a row without keys
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None])
        return self.o_proj(y.transpose(1, 2).flatten(-2)).reshape(1, B * T, -1)

    @staticmethod
    def append(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B,H,T,Dh] after the cached context; return views of the whole context.

        The buffers double when full (or are sized to cache["max_len"] at once), so appending a
        token copies nothing in the common case."""
        start, T = cache.get("len", 0), k.shape[2]
        end = start + T
        buf = cache.get("k")
        if buf is None or buf.shape[2] < end or buf.dtype != k.dtype:
            cap = max(end, cache.get("max_len", 0), 2 * buf.shape[2] if buf is not None else 0)
            for name, new in (("k", k), ("v", v)):
                grown = new.new_empty(new.shape[0], new.shape[1], cap, new.shape[3])
                if start:
                    grown[:, :, :start] = cache[name][:, :, :start]
                cache[name] = grown
        cache["k"][:, :, start:end] = k
        cache["v"][:, :, start:end] = v
        cache["len"] = end
        return cache["k"][:, :, :end], cache["v"][:, :, :end]

    def state_size(self) -> int:
        """Per token of context: a key and a value per head (the KV cache grows with the context)."""
        return 2 * self.H * self.Dh

    def inactive_parameters(self) -> int:
        """With head routing: the unchosen groups' query rows and output-projection columns."""
        return 0 if self.head_routing is None else self.head_routing.inactive_of([self.q_proj, self.o_proj])

    def flops_per_token(self, context: int = 2048) -> int:
        # QKᵀ and AV, 2·Dh FLOPs per (query, key) pair and head, half the context on average
        return 2 * context * self.H * self.Dh


