"""The router of a Mixture-of-Memories mixer linear -> softmax -> top-k, renormalised,
and the Switch-style load-balancing loss that keeps every memory in use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm import parallel
from lcsm.nn.stages.common import gate_dtype
from lcsm.parallel.context import all_gather


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


@dataclass
class RoutingStats:
    """What the balancing loss needs from one routed layer: f [E] the fraction of tokens that chose
    each memory (or expert), P [E] the mean router probability, n the number of tokens; the loss
    weight, the number chosen per token, and how the loss is aggregated over layers (`scope`)."""

    f: torch.Tensor
    P: torch.Tensor
    n: int
    weight: float
    top_k: int
    scope: str  # "pooled": one loss over the routers of all layers together; "per_layer": one per layer

    @classmethod
    def of(cls, routed: Routed, memories: int, weight: float, scope: str) -> "RoutingStats":
        mask = routed.mask(memories).flatten(0, -2).to(routed.probs.dtype)
        n = mask.shape[0]
        # sums over max(n, 1): no tokens (an empty shard) gives 0, not NaN
        f = mask.sum(0) / max(n, 1)
        P = routed.probs.flatten(0, -2).sum(0) / max(n, 1)
        sp = parallel.current()
        if sp is not None:
            # sequence parallel: this rank holds one of `size` equal slices of the same rows, and
            # the balance is that of the whole sequences: the mean of the slices' f and P (one
            # differentiable all-gather of [2,E]; its backward hands each rank its share of ∂P)
            f, P = all_gather(torch.stack([f, P]), sp).mean(0).unbind(0)
            n = n * sp.size
        return cls(f, P, n, weight, routed.index.shape[-1], scope)

    @property
    def memories(self) -> int:
        return self.f.shape[0]

    def loss(self) -> torch.Tensor:
        """L = E · Σ_e f_e · P_e (unweighted): top_k at perfect balance; only P carries a gradient."""
        return self.memories * (self.f * self.P).sum()

    def load(self) -> torch.Tensor:
        """[E] f_e / top_k: the share of routed slots each memory received."""
        return self.f / self.top_k


def balancing_loss(stats: list[RoutingStats]) -> torch.Tensor | float:
    """The weighted balancing loss of a model's routed layers.

    per_layer layers add weight · L each (the paper-era Mixture-of-Memories code, Switch per layer);
    pooled layers with the same (E, weight) are pooled first, as fla's MoM model does over the router
    logits of all layers: f and P are token-weighted means over those layers, then one
    weight · E · Σ_e f_e P_e. Returns 0.0 without routed layers."""
    total = 0.0
    pools: dict[tuple, list[RoutingStats]] = {}
    for s in stats:
        if s.scope == "per_layer":
            total = total + s.weight * s.loss()
        else:
            pools.setdefault((s.memories, s.weight), []).append(s)
    for (E, weight), group in pools.items():
        n = max(sum(s.n for s in group), 1)
        f = sum(s.f * s.n for s in group) / n
        P = sum(s.P * s.n for s in group) / n
        total = total + weight * E * (f * P).sum()
    return total


def load_balancing_loss(routed: Routed, memories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch / Mixtral balancing loss of one layer and the load of each memory (or expert).

    L = E · Σ_e f_e · P_e, f_e = fraction of tokens that chose memory e (over all B·T tokens),
    P_e = mean router probability of e. L = top_k at perfect balance; only P carries a gradient.
    Returns (L scalar, load [E] = f_e / top_k, the share of routed slots each memory received).
    """
    stats = RoutingStats.of(routed, memories, 1.0, "per_layer")
    return stats.loss(), stats.load()
