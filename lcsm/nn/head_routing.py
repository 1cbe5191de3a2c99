"""Attention experts (LLaMA-MoE-v2's attention MoE): a token mixer's heads in G groups, a router
that chooses the top-k groups per token, and the other groups' outputs zeroed before the output
projection.

    y [B,T,H,D] -> y_g · scale · w_g(x)   for each group g of H/G heads (w_g = 0 where not chosen)

The router is lcsm.nn.routing.Router (softmax over G in fp32, top-k, renormalised over the chosen
k; top-1 keeps its probability). With top_k = G, a zero router (uniform 1/G) and scale = G the
mixer is exactly the unrouted one: what `lcsm upcycle --attention-experts` starts from.

Only the read-out is routed. An EOS mixer still runs the recurrence for every head, so every
head's memory keeps being updated and a group that a later token chooses holds the exact state
(decoding through the cache equals the full forward); an attention mixer still writes every
head's keys and values to its KV cache for the same reason. Compute is not saved: all heads are
computed and the unchosen ones multiplied by zero (the mixers' `inactive_parameters` count what
a sparse read-out would skip). This differs from Mixture-of-Memories (lcsm/nn/mixers/mom.py),
where the router chooses among several memories *inside* one head and an unchosen memory is not
written at that token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lcsm.nn.routing import Router, RoutingStats


class HeadRouting(nn.Module):
    """Per-token weights for G groups of heads, applied to a mixer's per-head output.

    spec: lcsm.config.spec.HeadRouting; heads: the mixer's H (G divides it). The router's weight
    is `router.proj.weight` [G, d_model]. Leaves `routing_stats` (its balancing loss, one per
    layer) and `aux_stats` (`max_load`: the busiest group's share of routed slots × G, 1 = balanced)
    for Model.aux_loss() / Model.aux_stats().
    """

    def __init__(self, spec, d_model: int, heads: int):
        super().__init__()
        self.G, self.k, self.scale = spec.groups, spec.top_k, spec.scale
        self.heads = heads
        self.aux_weight = spec.aux_loss_weight
        self.router = Router(d_model, self.G, self.k)
        self.routing_stats = None
        self.aux_stats = None

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [B,T,H,D] (a mixer's output per head, before the output projection), x [B,T,d] (the
        mixer's input, which the router reads) -> [B,T,H,D] with the unchosen groups zeroed."""
        routed = self.router(x)
        stats = RoutingStats.of(routed, self.G, self.aux_weight, "per_layer")
        self.routing_stats = stats if self.aux_weight > 0 else None
        self.aux_stats = {"max_load": (stats.load().max() * self.G).detach()}  # tensors: no host sync per step
        w = routed.dense_weights(self.G) * self.scale  # [B,T,G], 0 where not chosen
        B, T, H, D = y.shape
        return (y.view(B, T, self.G, H // self.G, D) * w[..., None, None].to(y.dtype)).view(B, T, H, D)

    def inactive_of(self, per_head: list[nn.Linear]) -> int:
        """Parameters a token does not use: the unchosen (G - k)/G of the weight of each Linear in
        `per_head` whose rows (a query projection) or columns (the output projection) are per head."""
        return sum(lin.weight.numel() * (self.G - self.k) // self.G for lin in per_head)
