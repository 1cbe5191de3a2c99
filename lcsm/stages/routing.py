"""The router of a Mixture-of-Memories mixer (DESIGN §4): linear -> softmax -> top-k, renormalised,
and the Switch-style load-balancing loss that keeps every memory in use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import gate_dtype


@dataclass
class Routed:
    weights: torch.Tensor  # [..., k] ([B,T,k] for MoM, [N,k] for MoE) renormalised over the chosen k (sum 1; top-1 keeps its probability), gate dtype
    index: torch.Tensor  # [..., k] long, the chosen memories, distinct per token
    probs: torch.Tensor  # [..., E] the softmax over all memories (for the balancing loss)

    def dense_weights(self, memories: int) -> torch.Tensor:
        """[B,T,E]: the weight of every memory at every token, 0 where not chosen."""
        out = self.weights.new_zeros(*self.weights.shape[:-1], memories)
        return out.scatter(-1, self.index, self.weights)

    def mask(self, memories: int) -> torch.Tensor:
        """[B,T,E] bool: memory chosen at this token."""
        out = torch.zeros(*self.index.shape[:-1], memories, dtype=torch.bool, device=self.index.device)
        return out.scatter(-1, self.index, True)


class Router(nn.Module):
    """x [B,T,d] -> Routed: probs = softmax(W x) over E memories, the top_k of them, weights
    renormalised over the chosen ones (Mixtral style; with top_k = 1 the raw probability, as in
    Switch). Computed in fp32 (fp64 for fp64 x)."""

    def __init__(self, d_model: int, memories: int, top_k: int):
        super().__init__()
        self.memories, self.top_k = memories, top_k
        self.proj = nn.Linear(d_model, memories, bias=False)

    def forward(self, x: torch.Tensor) -> Routed:
        probs = F.softmax(self.proj(x).to(gate_dtype(x)), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        # renormalised over the chosen k; one memory keeps its probability (Switch), or its weight
        # would always be 1 and the router would learn from the balancing loss alone
        weights = top / top.sum(-1, keepdim=True) if self.top_k > 1 else top
        return Routed(weights=weights, index=index, probs=probs)


def load_balancing_loss(routed: Routed, memories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch / Mixtral balancing loss as fla's MoM computes it, and the load of each memory (or
    expert: the MoE channel mixer uses the same loss).

    L = E · Σ_e f_e · P_e, f_e = fraction of tokens that chose memory e (over all B·T tokens),
    P_e = mean router probability of e. L = top_k at perfect balance; only P carries a gradient.
    Returns (L scalar, load [E] = f_e / top_k, the share of routed slots each memory received).
    """
    mask = routed.mask(memories).flatten(0, -2).to(routed.probs.dtype)
    n = max(mask.shape[0], 1)  # sums over max(n, 1): no tokens (an empty shard) gives 0, not NaN
    f = mask.sum(0) / n
    P = routed.probs.flatten(0, -2).sum(0) / n
    return memories * (f * P).sum(), f / routed.index.shape[-1]
