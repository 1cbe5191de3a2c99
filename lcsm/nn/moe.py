"""Mixture-of-experts channel mixer: top-k routing over E GLU experts, computed with batched matmuls.

Tokens are sorted by expert and packed into one padded [E, C, d] buffer (C = the largest group),
so each of the three expert projections is a single torch.bmm over all experts: no Python loop
over tokens or experts. Dropless by default: every routed token is computed; with a
capacity_factor, tokens past an expert's capacity C = ceil(factor · N·k / E) are dropped (their
slot contributes zero) and the fraction dropped is logged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcsm.nn.routing import Routed, RoutingStats


class MoE(nn.Module):
    """x [..., d] -> [..., d]: scale · Σ_{e in top-k} w_e GLU_e(x) (+ a shared GLU expert, unscaled).

    Router: softmax over E experts in (at least) fp32, top-k, weights renormalised to sum to one (Mixtral;
    with top_k = 1 the raw probability, as in Switch).
    Load balancing: the loss of the Mixture-of-Memories router (lcsm.nn.routing), aux =
    weight · E · Σ_e f_e P_e with f_e the fraction of tokens that chose expert e and P_e its mean
    router probability (top_k at perfect balance), one per layer; its statistics are left in
    self.routing_stats for Model.aux_loss();
    self.aux_stats holds the largest expert load (its share of routed slots · E, 1 = balanced).
    scale = spec.output_scale (LLaMA-MoE's scale_factor; an upcycled layer uses E, so that with
    top_k = E and a uniform router it is exactly the dense GLU it was split from).
    """

    graph_safe = False  # buffers sized from the routing on the host: not capturable in a CUDA graph

    def __init__(self, spec, d_model: int, hidden: int, activation, shared: nn.Module | None = None):
        super().__init__()
        E = spec.experts
        self.E, self.k, self.act = E, spec.top_k, activation
        self.aux_weight, self.capacity_factor = spec.aux_loss_weight, spec.capacity_factor
        self.scale = spec.output_scale
        self.router = nn.Linear(d_model, E, bias=False)
        self.w_gate = nn.Parameter(torch.randn(E, d_model, hidden) * 0.02)
        self.w_up = nn.Parameter(torch.randn(E, d_model, hidden) * 0.02)
        self.w_down = nn.Parameter(torch.randn(E, hidden, d_model) * 0.02)
        self.shared = shared
        self.routing_stats = None
        self.aux_stats = None

    def flops_per_token(self) -> int:
        """Matmul FLOPs of the k active experts and the router (the shared expert is an nn.Linear GLU)."""
        d, hidden = self.w_gate.shape[1:]
        return 2 * (self.k * 3 * d * hidden + d * self.E)

    def inactive_parameters(self) -> int:
        """Parameters a token does not use: the E - k experts it is not routed to."""
        d, hidden = self.w_gate.shape[1:]
        return (self.E - self.k) * 3 * d * hidden

    def route(self, x: torch.Tensor):
        """x [N,d] -> (weights [N,k], experts [N,k] long, probs [N,E] fp32)."""
        logits = self.router(x)
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        w, idx = torch.topk(probs, self.k, dim=-1)
        # renormalised over the chosen k (Mixtral); one expert keeps its probability (Switch), or
        # its weight would be 1 and the router would learn from the balancing loss alone
        return (w / w.sum(-1, keepdim=True) if self.k > 1 else w), idx, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.E, self.k
        w, idx, probs = self.route(x)

        # sort the N·k (token, expert) slots by expert; slot j of expert e goes to buffer[e, j]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        token = order // k
        counts = torch.bincount(flat, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(N * k, device=x.device) - starts[expert]
        keep = None
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * N * k / E)
            keep = pos < cap
            expert, token, pos, order = expert[keep], token[keep], pos[keep], order[keep]
        else:
            cap = int(counts.max())  # dropless: the buffer is as deep as the busiest expert
        buf = x.new_zeros(E, max(cap, 1), x.shape[-1])
        buf[expert, pos] = x[token]
        h = self.act(torch.bmm(buf, self.w_gate.to(x.dtype))) * torch.bmm(buf, self.w_up.to(x.dtype))
        out = torch.bmm(h, self.w_down.to(x.dtype))  # [E, C, d]
        slot_w = w.reshape(-1)[order].to(x.dtype)
        if self.scale != 1.0:  # folded into the slot weights: no extra pass over the output
            slot_w = slot_w * self.scale
        y = x.new_zeros(N, x.shape[-1]).index_add_(0, token, out[expert, pos] * slot_w[:, None])
        if self.shared is not None:
            y = y + self.shared(x)

        # the balancing loss of the Mixture-of-Memories router (top_k at perfect balance)
        stats = RoutingStats.of(Routed(weights=w, index=idx, probs=probs), E, self.aux_weight, "per_layer")
        load = stats.load()
        self.routing_stats = stats
        self.aux_stats = {"max_load": (load.max() * E).detach()}  # 1 = balanced; tensors, converted at logging time
        if keep is not None:
            self.aux_stats["dropped"] = (1 - keep.float().mean()).detach()
        return y.reshape(shape)
