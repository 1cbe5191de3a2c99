"""Data parallelism over the grid: shard the batch, one globally normalised loss, summed gradients.

Every rank holds the whole model (replicated, as DDP). The loss on a rank is its labelled tokens'
cross-entropy sum divided by the labelled-token count of the whole global batch, so the sum of all
ranks' gradients is exactly the gradient of the single-process mean loss, whatever the split into
rows (data) and slices (sequence). `sync_gradients` sums them with bucketed all-reduces after the
backward; every rank then takes the same optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .context import sequence_parallel
from .grid import Grid

IGNORE = -100


def sharded_loss(model, tokens: torch.Tensor, labels: torch.Tensor, grid: Grid | None):
    """Global batch tokens, labels [B,T] -> (this rank's loss term, the global mean loss as float).

    Run under the sequence-parallel context; call .backward() on the loss term (in the same context)."""
    from lcsm.evaluate import hidden_states

    if grid is not None and grid.world > 1:
        tokens, labels = grid.shard(tokens), grid.shard(labels)
    mask = labels != IGNORE
    count = mask.sum().to(torch.float64)
    h = hidden_states(model, tokens)
    logits = model.lm_head(h[mask])
    total = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[mask], reduction="sum")
    stats = torch.stack([total.detach().to(torch.float64), count])
    if grid is not None and grid.world > 1:
        dist.all_reduce(stats)
    n = stats[1].clamp_min(1)
    # the zero term keeps every layer in the graph on a rank without labels: the sequence-parallel
    # collectives in the backward need every rank
    return total / n.to(total.dtype) + 0.0 * h.float().sum(), float(stats[0] / n)  # sum: no NaN on a rank without rows


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


def train_step(model, optimizer, tokens, labels, grid: Grid | None, grad_clip: float | None = None) -> float:
    """One optimizer step on the global batch tokens, labels [B,T]; returns the global mean loss."""
    T = tokens.shape[1] // (grid.sequence if grid is not None else 1)
    with sequence_parallel(grid.context(T) if grid is not None else None):
        loss, value = sharded_loss(model, tokens, labels, grid)
        aux = model.aux_loss()
        if torch.is_tensor(aux) and grid is not None:
            aux = aux / grid.world  # the ranks' aux losses are averaged
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
    if grid is not None and grid.world > 1:
        sync_gradients(model)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value
