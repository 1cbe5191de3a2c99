"""Data parallelism on torch's engine: DDP or FSDP2 over the grid's DeviceMesh (lcsm/parallel/grid.py).

lcsm writes no gradient collective of its own. The trainer (lcsm/run/trainer.py) gives each rank
the loss sum of its tokens divided by the labelled-token count of the whole global batch; the sum
of the ranks' gradients is then exactly the one-process gradient, whatever the split into rows
(data) and slices (sequence). DDP and FSDP2 *average* gradients over the ranks they reduce over,
which here is every rank (the sp ranks hold different tokens of the same rows), so the trainer
multiplies its loss by `reduction_scale(grid)` = the world size, and the average is that sum.

    ddp    DistributedDataParallel over the world group; all-reduce in buckets during the backward
    fsdp   fully_shard on every block, then on the root, over the flattened (dp_shard, sp) dims:
           parameters, gradients and AdamW moments are 1/world per rank; reduce-scatter in the backward
    hsdp   the same over the 2-D (dp_replicate, dp_shard_sp) mesh: sharded in a group, all-reduced across groups
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from .grid import Grid


def reduction_scale(grid: Grid | None) -> int:
    """What the loss is multiplied by so that DDP's / FSDP2's gradient average over the ranks is the sum."""
    return 1 if grid is None else grid.world


def wrap(model: torch.nn.Module, grid: Grid | None, precision: str = "fp32", device: torch.device | None = None):
    """The module the trainer calls for forward and backward: the model itself (one process; for
    fsdp and hsdp the model, sharded in place by fully_shard) or a DistributedDataParallel around it.

    The optimizer must be built after this: fully_shard replaces the parameters by their shards
    (DTensors). `model.blocks` are the units of sharding (one all-gather and one reduce-scatter per
    block); the root group holds the embedding, the final norm and the LM head (they must stay
    together: a tied head is the embedding, and the loss reads the head's weight directly).
    """
    if grid is None or grid.world == 1:
        return model
    if grid.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = device is not None and device.type == "cuda"
        index = (device.index if device.index is not None else torch.cuda.current_device()) if on_cuda else None
        # DDP broadcasts rank 0's weights at construction. Buffers are constants of the spec (no
        # running statistics): no broadcast before every forward. Every parameter gets a gradient
        # on every rank (the model keeps all of its output in the graph under torch.distributed,
        # lcsm.nn.model), so the unused-parameter search is not needed.
        # (recent torch renamed broadcast_buffers to forward_sync_buffers)
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(model, process_group=dist.group.WORLD, device_ids=[index] if on_cuda else None,
                                       **no_sync)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 shards what each rank has: make sure every rank starts from rank 0's weights (the
    # same seed gives them anyway; a different RNG stream on some device must not split the run)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=0)
    # bf16: parameters all-gathered and used in bf16, gradients reduced in fp32, the fp32 shards
    # are the master weights the optimizer updates (autocast still runs around the forward)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    mesh = grid.fsdp_mesh
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def gradient_sync(engine, grid: Grid | None, sync: bool):
    """Around the forward and backward of one micro-batch; sync=False for all but the last of a step.

    ddp: no_sync() (gradients accumulate locally, one all-reduce on the last micro-batch).
    fsdp: every micro-batch reduce-scatters; skipping it would hold unsharded gradients of the
    whole model between micro-batches, the memory FSDP exists to save. hsdp: the reduce-scatter
    in the shard group every micro-batch, the all-reduce across the replicas only on the last."""
    if grid is None or grid.world == 1:
        yield
        return
    if grid.strategy == "ddp":
        with engine.no_sync() if not sync else nullcontext():
            yield
        return
    if grid.strategy == "hsdp":
        engine.set_requires_all_reduce(sync)  # recursive: every block's group
    yield


def clip_grad_norm(parameters, max_norm: float, sharded: bool = False) -> float:
    """torch.nn.utils.clip_grad_norm_, also on FSDP2's sharded (DTensor) gradients (sharded=True):
    the norm is that of the whole gradient (the same on every rank, the one-process norm)."""
    parameters = [p for p in parameters if p.grad is not None]
    if not sharded:  # whole gradients (one process, ddp): every rank holds all of it
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-shard partial norms, reduced over the mesh
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)
