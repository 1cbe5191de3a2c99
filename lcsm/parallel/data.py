"""Data parallelism over the grid: replicated weights and summed gradients.

Every rank holds the whole model (replicated, as DDP). The trainer (lcsm/run/trainer.py) divides
each rank's loss sum by the labelled-token count of the whole global batch, so the sum of all
ranks' gradients is exactly the gradient of the single-process mean loss, whatever the split into
rows (data) and slices (sequence). `sync_gradients` sums them with bucketed all-reduces after the
backward; every rank then takes the same optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .grid import Grid


def sync_gradients(model, group=None, bucket_bytes: int = 256 << 20) -> None:
    """Sum every parameter's gradient over the group (a missing gradient counts as zeros; a
    parameter that no rank gave a gradient keeps none, as in one process, so AdamW leaves it be)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(had, op=dist.ReduceOp.MAX, group=group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0
    for p, some_rank_had_one in zip(params, had.tolist()):
        if not some_rank_had_one:
            p.grad = None


def wrap(model, grid: Grid | None):
    """Every rank starts from rank 0's weights (the same seed gives them anyway; this makes sure)."""
    if grid is not None and grid.world > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=0)
    return model
