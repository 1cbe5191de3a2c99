"""The sequence-parallel context the mixers consult, and differentiable collectives over it.

A model never knows how it is split: the trainer (or a test) wraps forward and backward in
`with sequence_parallel(ctx):`, and every layer that mixes along time asks `current()` for the
process group, its rank in it and the global position of its slice's first token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallel:
    """This process's part of a sequence split over `size` ranks of `group` (slices in rank order)."""

    group: object  # a torch.distributed ProcessGroup
    rank: int  # rank within group: which slice this process holds
    size: int
    offset: int  # global position of this slice's first token (rank · T_local)


_CURRENT: SequenceParallel | None = None


def distributed() -> bool:
    """Several processes of one run (torch.distributed initialised with a world of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> SequenceParallel | None:
    """The active context, or None (one process holds the whole sequence)."""
    return _CURRENT if _CURRENT is not None and _CURRENT.size > 1 else None


@contextmanager
def sequence_parallel(ctx: SequenceParallel | None):
    global _CURRENT
    previous, _CURRENT = _CURRENT, ctx
    try:
        yield ctx
    finally:
        _CURRENT = previous


class _AllGather(torch.autograd.Function):
    """x [...] on every rank -> [size, ...]; the backward sums the gradients of all ranks'
    copies and keeps this rank's (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter(out, list(grad.unbind(0)), group=ctx.group)
            return out, None, None, None
        # gloo has no reduce-scatter: sum everything (in a copy: autograd owns grad), keep this rank's part
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank].clone(), None, None, None


def all_gather(x: torch.Tensor, ctx: SequenceParallel) -> torch.Tensor:
    """Differentiable all-gather over the sequence group: x [...] -> [size, ...] in rank order."""
    return _AllGather.apply(x, ctx.group, ctx.rank, ctx.size)


def previous_tail(x: torch.Tensor, n: int, ctx: SequenceParallel) -> torch.Tensor:
    """The last n steps of the previous rank's slice, zeros on rank 0: x [B,T,C] -> [B,n,C].

    For short causal convolutions; one all-gather of [B,n,C] (independent of T)."""
    if x.shape[1] < n:
        raise ValueError(f"sequence parallelism: a slice of {x.shape[1]} tokens is shorter than a convolution tail of {n}")
    tails = all_gather(x[:, x.shape[1] - n :], ctx)
    # rank 0 starts from zeros; multiplying keeps the all-gather in its graph (every rank joins the backward)
    return tails[ctx.rank - 1] if ctx.rank > 0 else tails[0] * 0.0
