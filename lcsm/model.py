"""The language model: embedding -> blocks (pre-norm, token mixer, channel mixer, residual) -> norm -> LM head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm.mixers import build_mixer, make_norm
from lcsm.spec import ModelSpec, load_model_spec

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": lambda x: x}


def _round_hidden(d_model: int, ratio: float, multiple: int = 8) -> int:
    return max(multiple, int(round(d_model * ratio / multiple)) * multiple)


class GLU(nn.Module):
    def __init__(self, spec, d_model: int):
        super().__init__()
        hidden = _round_hidden(d_model, spec.hidden_ratio)
        self.act = ACTIVATIONS[spec.activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    def __init__(self, spec, d_model: int):
        super().__init__()
        hidden = _round_hidden(d_model, spec.hidden_ratio)
        self.act = ACTIVATIONS[spec.activation]
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


def build_channel_mixer(cm, d_model: int) -> nn.Module:
    if cm.kind == "moe":
        from lcsm.moe import MoE

        shared = GLU(cm, d_model) if cm.shared_expert else None
        return MoE(cm, d_model, _round_hidden(d_model, cm.hidden_ratio), ACTIVATIONS[cm.activation], shared)
    return (GLU if cm.kind == "glu" else MLP)(cm, d_model)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.mixer_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.mixer = build_mixer(spec.layer_mixer(layer_idx), spec.d_model, spec.n_heads, layer_idx, spec.n_layers, spec.norm_eps)
        cm = spec.channel_mixer
        self.channel_mixer = None
        if cm.kind != "none":
            self.channel_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
            self.channel_mixer = build_channel_mixer(cm, spec.d_model)

    def forward(self, x, lower_bound=None, cache=None):
        x = x + self.mixer(self.mixer_norm(x), lower_bound=lower_bound, cache=cache)
        if self.channel_mixer is not None:
            x = x + self.channel_mixer(self.channel_norm(x))
        return x


@dataclass
class LayerSummary:
    index: int
    mixer: str
    parameters: int
    state_size: int  # numbers per sequence (EOS) or per token of context (attention)
    state_grows: bool
    flops_per_token: int


class Model(nn.Module):
    """A language model built from a ModelSpec. forward(tokens [B,T] long) -> logits [B,T,vocab]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec, l) for l in range(spec.n_layers))
        self.norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        osc = getattr(spec.mixer, "oscillation", None)
        self.lower_bounds = None
        if getattr(osc, "lower_bound", None) == "layerwise":
            # HGRN2: Γ ∈ R^{L×n}, β_l = cumsum(softmax(Γ, 0))_l - β_0, so β_0 = 0 and β grows with depth
            self.lower_bounds = nn.Parameter(torch.ones(spec.n_layers, self._gate_width()))
        self.apply(self._init)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @classmethod
    def from_spec(cls, spec: str | Path | dict | ModelSpec) -> "Model":
        """Build from a YAML path, a zoo name, a dict or a ModelSpec (raises lcsm.spec.SpecError)."""
        return cls(load_model_spec(spec))

    def _gate_width(self) -> int:
        mixer = next(b.mixer for b in self.blocks if b.mixer.spec is self.spec.mixer)  # hybrids: a layer of the main mixer
        return mixer.H * (mixer.K if mixer.spec.oscillation.kind == "vector_k" else 1)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2 style small normal weights; biases keep what the stages set (e.g. Mamba's Δ bias),
        # and a stage marks a projection `_keep_init` where its starting weights matter
        if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
            nn.init.normal_(module.weight, std=0.02)

    def layer_bounds(self) -> list[torch.Tensor | None]:
        if self.lower_bounds is None:
            return [None] * len(self.blocks)
        beta = torch.cumsum(F.softmax(self.lower_bounds, dim=0), dim=0)
        beta = beta - beta[0]
        return list(beta)

    def forward(self, tokens: torch.Tensor, cache: list[dict] | None = None) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,vocab]. cache: one dict per layer (lcsm.cache.new_cache)
        to decode: the layers start from the state found there and leave their new state."""
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache: one dict per layer ({len(self.blocks)}), got {len(cache)}")
        x = self.embed(tokens)
        for block, bound, layer_cache in zip(self.blocks, self.layer_bounds(), cache or [None] * len(self.blocks)):
            x = block(x, lower_bound=bound, cache=layer_cache)
        return self.lm_head(self.norm(x))

    def generate(self, prompt, max_new_tokens: int = 256, **sampling):
        """Sample a continuation of `prompt` (token ids): see lcsm.generate.generate."""
        from lcsm.generate import generate

        return generate(self, prompt, max_new_tokens, **sampling)

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the weighted auxiliary losses left by the last forward (0.0 when there are none).

        The mechanism, for every routed part (Mixture-of-Memories mixers, MoE channel mixers): a
        module sets `self.aux_loss` (a scalar tensor, weight already applied) and may set
        `self.aux_stats` (a dict of floats for metrics.jsonl, e.g. the load of each memory) in its
        forward. The trainer adds `aux_loss()` to the objective and logs `aux_stats()`.
        """
        losses = [m.aux_loss for m in self.modules() if m is not self and torch.is_tensor(getattr(m, "aux_loss", None))]
        return torch.stack(losses).sum() if losses else 0.0

    def aux_stats(self) -> dict[str, float]:
        """Metrics of the routed modules from the last forward, keyed `<module path>.<name>`."""
        stats = {}
        for name, m in self.named_modules():
            found = getattr(m, "aux_stats", None)
            for key, value in (found if isinstance(found, dict) else {}).items():  # (Model's own is this method)
                stats[f"{name}.{key}"] = float(value)
        return stats

    def set_backend(self, backend: str) -> "Model":
        """Choose the recurrence backend of every EOS layer ("auto", "torch", "reference", ...)."""
        for block in self.blocks:
            if hasattr(block.mixer, "backend"):
                block.mixer.backend = backend
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def summary(self, context: int = 2048) -> list[LayerSummary]:
        """Per layer: parameters, recurrent state size and FLOPs per token (attention at `context`)."""
        rows = []
        for idx, block in enumerate(self.blocks):
            mixer = block.mixer
            is_attn = mixer.spec.kind == "attention"
            matmul = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
            flops = 2 * matmul + (mixer.flops_per_token(context) if is_attn else mixer.flops_per_token())
            if hasattr(block.channel_mixer, "flops_per_token"):  # MoE: only the routed experts run
                flops += block.channel_mixer.flops_per_token() - 2 * block.channel_mixer.router.weight.numel()
            rows.append(
                LayerSummary(
                    index=idx,
                    mixer=mixer.spec.kind if is_attn else f"eos/{mixer.spec.oscillation.kind}",
                    parameters=sum(p.numel() for p in block.parameters()),
                    state_size=mixer.state_size(),
                    state_grows=is_attn,
                    flops_per_token=flops,
                )
            )
        return rows
