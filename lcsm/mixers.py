"""Token mixers: the EOS mixer (stages -> canonical tensors -> recurrence) and softmax attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lcsm import kernels
from lcsm import parallel
from lcsm.cache import store, sub
from lcsm.kernels.common import STATIC_DIMS
from lcsm.parallel import lasp
from lcsm.spec import AttentionMixer as AttentionSpec
from lcsm.spec import EOSMixer as EOSSpec
from lcsm.stages.expand import Expand
from lcsm.stages.input import Input
from lcsm.stages.oscillation import build_oscillation
from lcsm.stages.shrink import Shrink


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class EOSMixer(nn.Module):
    """x [B,T,d] -> [B,T,d] through m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ, y_t = m_tᵀ s_t per head.

    Parameter names are stable (tests and checkpoints read them): input.proj.proj, expand.proj.proj,
    oscillation.*, shrink.proj.proj, out_norm, gate_proj, D, o_proj.
    """

    fixed_state = True  # the decoding state has one size at any context (lcsm.generate may graph it)

    def __init__(self, spec: EOSSpec, d_model: int, n_heads: int, layer_idx: int, n_layers: int, norm_eps: float = 1e-5):
        super().__init__()
        H, K, V = spec.dims(d_model, n_heads)
        self.spec, self.H, self.K, self.V = spec, H, K, V
        self.backend = "auto"
        rotated = spec.oscillation.kind == "rotation"
        self.oscillation = build_oscillation(spec.oscillation, d_model, H, K, V, layer_idx, n_layers)
        self.input = Input(spec.input, d_model, H, V, spec.bias)
        self.expand = Expand(spec.expand, d_model, H, K, spec.bias, rotated)
        self.shrink = Shrink(spec.shrink, d_model, H, K, spec.bias, rotated)
        out = spec.output
        self.out_norm = None
        if out.norm != "none":
            self.out_norm = make_norm(out.norm, V if out.norm_scope == "head" else H * V, norm_eps)
        self.gate_proj = None
        if out.gate != "none":
            self.gate_proj = (
                nn.Sequential(nn.Linear(d_model, out.gate_rank, bias=False), nn.Linear(out.gate_rank, H * V, bias=True))
                if out.gate_rank
                else nn.Linear(d_model, H * V, bias=spec.bias)
            )
        self.D = nn.Parameter(torch.ones(H, V)) if out.skip else None
        self.o_proj = nn.Linear(H * V, d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x [B,T,d] -> [B,T,d]. cache (decoding, see lcsm/cache.py): "state" [B,H,K,V] fp32, the
        absolute position "offset" (a 0-d tensor, for rotations) and the stages' own sub-dicts."""
        B, T, _ = x.shape
        sp = parallel.current()  # sequence parallel: x is this rank's slice of the sequence
        positions = torch.arange(T, device=x.device) + (sp.offset if sp else 0)
        if cache is not None:
            if "offset" not in cache:
                cache["offset"] = torch.zeros((), dtype=torch.long, device=x.device)
            offset = cache["offset"]
            positions = positions + offset
        osc = self.oscillation(x, positions, lower_bound, sub(cache, "oscillation"))
        i, i_raw = self.input(x, osc, sub(cache, "input"))
        e = self.expand(x, osc, sub(cache, "expand"))
        s = self.shrink(x, osc, sub(cache, "shrink"))
        gates = osc.gates()
        if cache is not None:
            y = self.recur(s, e, i, gates, cache)
            offset.add_(T)  # in place: a captured decoding step advances it on replay
        else:
            y, ht = kernels.eos_recurrence(s, e, i, **gates, output_final_state=sp is not None, backend=self.backend)
            if sp is not None:  # LASP-2: add the decayed state of the earlier slices
                y = lasp.lasp2(y, ht, s, gates, sp)
        if self.D is not None:
            y = y + self.D.to(y.dtype) * i_raw
        return self.readout(y, x)

    def recur(self, s, e, i, gates: dict, cache: dict) -> torch.Tensor:
        """The recurrence from cache["state"] (zero when absent), leaving the final state there:
        the one-token step for T = 1, the chunked kernel (prefill) otherwise. Returns y [B,T,H,V]."""
        B, T = s.shape[:2]
        state = cache.get("state")
        if T > 1:
            y, ht = kernels.eos_recurrence(s, e, i, **gates, h0=state, output_final_state=True, backend=self.backend)
            store(cache, "state", ht)
            return y
        if state is None:
            state = cache["state"] = s.new_zeros(B, self.H, self.K, self.V, dtype=torch.float32)
        # per-token gates lose their time axis; static ones ([H], [H,K], [H,K,V]) stay as they are
        one = {k: v if v.dim() <= STATIC_DIMS[k] else v[:, 0] for k, v in gates.items()}
        y, new = kernels.eos_step(s[:, 0], e[:, 0], i[:, 0], state, **one, backend=self.backend)
        store(cache, "state", new)
        return y[:, None]

    def readout(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [B,T,H,V] -> norm, output gate, projection -> [B,T,d]."""
        out = self.spec.output
        gate = None
        if self.gate_proj is not None:
            gate = (F.silu if out.gate == "silu" else torch.sigmoid)(self.gate_proj(x)).unflatten(-1, (self.H, self.V))
        if gate is not None and out.gate_first:
            y = y * gate
        if self.out_norm is not None:
            y = self.out_norm(y) if out.norm_scope == "head" else self.out_norm(y.flatten(-2)).unflatten(-1, (self.H, self.V))
        if gate is not None and not out.gate_first:
            y = y * gate
        return self.o_proj(y.flatten(-2))

    def state_size(self) -> int:
        """Numbers held per sequence between tokens: the K×V memories plus short-conv tails."""
        size = self.H * self.K * self.V
        for stage in (self.input.proj, getattr(self.expand, "proj", None), self.shrink.proj):
            conv = getattr(stage, "conv", None)
            if conv is not None:
                size += (conv.size - 1) * stage.H * stage.D
        return size

    def flops_per_token(self) -> int:
        """Recurrent-form FLOPs per token beyond the matmuls: decay, write (e iᵀ) and read (mᵀs)."""
        decays = bool(self.spec.oscillation.kind not in ("ones", "rotation"))
        return (2 + 2 + decays) * self.H * self.K * self.V


DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rope(x: torch.Tensor, base: float, start: int = 0) -> torch.Tensor:
    """Rotary position embedding on [B,T,H,D] (rotate-half convention), positions start..start+T-1."""
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    ang = torch.arange(start, start + T, device=x.device, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cos(ang).to(x.dtype)[:, None, :], torch.sin(ang).to(x.dtype)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionMixer(nn.Module):
    """Causal softmax attention through torch's scaled_dot_product_attention."""

    fixed_state = False  # the KV cache grows with the context

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, layer_idx: int, n_layers: int, norm_eps: float = 1e-5):
        super().__init__()
        self.spec = spec
        self.H = spec.heads or n_heads
        self.Dh = d_model // self.H
        self.q_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=spec.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """x [B,T,d] -> [B,T,d]. cache (decoding): the KV cache "k", "v" [B,H,capacity,Dh] and the
        context length "len"; "max_len", when the caller sets it, sizes the buffers once."""
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
                return self.o_proj(y.transpose(1, 2).flatten(-2))
        if sp is not None:  # LASP-2H: all-gather K and V along the sequence
            y = lasp.attention(q, k, v, sp)
        else:  # no context before these tokens: plain causal attention (FlashAttention for a long prefill)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).flatten(-2))

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

    def flops_per_token(self, context: int = 2048) -> int:
        # QKᵀ and AV, 2·Dh FLOPs per (query, key) pair and head, half the context on average
        return 2 * context * self.H * self.Dh


def build_mixer(spec, d_model: int, n_heads: int, layer_idx: int, n_layers: int, norm_eps: float) -> nn.Module:
    cls = EOSMixer if spec.kind == "eos" else AttentionMixer
    if getattr(spec, "routing", None) is not None:
        from lcsm.mom import MoMMixer  # late: lcsm.mom builds on EOSMixer

        cls = MoMMixer
    return cls(spec, d_model, n_heads, layer_idx, n_layers, norm_eps)
