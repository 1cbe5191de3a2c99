"""The device mesh of a run: world = data × sequence, one torch DeviceMesh with named dimensions.

    mesh dims   dp_replicate × dp_shard × sp          (sizes R × F × S; R · F = D data ranks)
    ddp         D × 1 × S      weights replicated over every rank
    fsdp        1 × D × S      weights sharded over every rank (the sp ranks hold shards too)
    hsdp        D/F × F × S    sharded within a group of F data ranks (and their sp ranks), replicated across groups

Ranks are laid out sp-fastest (rank = dp_rank · S + sp_rank): the ranks that talk in every layer
(LASP-2) are neighbours, on one node's NVLink. Flattened dimensions name the groups the trainer
uses: "dp" (R·F, which rows a rank takes), "dp_shard_sp" (F·S, FSDP2's shard group) and "sp" (the
sequence-parallel group of LASP-2 / LASP-2H). Gradients are reduced over every rank (each sp rank
holds different tokens of the same rows, so its gradient is part of the sum): DDP over the world,
FSDP2 over (dp_replicate, dp_shard_sp). `Grid` is the thin object the trainer holds: rank,
is_main, shard(x), context(T).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .context import SequenceParallel

STRATEGIES = ("ddp", "fsdp", "hsdp")
DIMS = ("dp_replicate", "dp_shard", "sp")


class ParallelError(ValueError):
    """Parallel settings that do not fit the world or the batch; str() is the message for the user."""


@dataclass
class Grid:
    world: int
    rank: int
    sequence: int  # S: ranks that share one sequence
    data: int  # D: ranks (of each sp position) that see different rows of the batch
    sp_rank: int
    dp_rank: int
    strategy: str = "ddp"
    shard_size: int = 1  # F: data ranks per shard group (fsdp: D, hsdp: the recipe's shard, ddp: 1)
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh with DIMS
    submeshes: dict = None  # "sp", the flattened "dp" and "dp_shard_sp", and "fsdp" (FSDP2's mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Weights, gradients and optimizer state split over ranks (fsdp, hsdp): checkpoints go through DCP."""
        return self.strategy in ("fsdp", "hsdp") and self.world > 1

    @property
    def sp_group(self):
        return self.submeshes["sp"].get_group()

    @property
    def dp_group(self):
        return self.submeshes["dp"].get_group()

    @property
    def fsdp_mesh(self):
        """FSDP2's mesh: 1-D (dp_shard_sp) for fsdp, 2-D (dp_replicate, dp_shard_sp) for hsdp."""
        return self.submeshes["fsdp"]

    def context(self, T_local: int) -> SequenceParallel | None:
        """The sequence-parallel context for slices of T_local tokens (None when S = 1)."""
        if self.sequence == 1:
            return None
        return SequenceParallel(self.sp_group, self.sp_rank, self.sequence, self.sp_rank * T_local)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows (data) and time slice (sequence) of a global batch [B,T,...].

        Rows are split as evenly as they go (an epoch's last batch may be short); the loss is
        normalised over the whole batch, so uneven rows do not change the gradient."""
        B, T = x.shape[:2]
        if T % self.sequence:
            raise ParallelError(f"parallel.sequence = {self.sequence} must divide the sequence length (here {T} tokens)")
        t = T // self.sequence
        rows = torch.tensor_split(x, self.data, dim=0)[self.dp_rank]
        return rows[:, self.sp_rank * t : (self.sp_rank + 1) * t]


def mesh_shape(sequence: int, data: int, strategy: str, shard: int | None) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, sp) sizes of a strategy."""
    if strategy == "ddp":
        return data, 1, sequence
    if strategy == "fsdp":
        return 1, data, sequence
    return data // shard, shard, sequence


def check_sizes(sequence: int, data: int, world: int, strategy: str = "ddp", shard: int | None = None) -> None:
    if sequence < 1 or data < 1:
        raise ParallelError(f"parallel.sequence and parallel.data must be >= 1 (got {sequence}, {data})")
    if strategy not in STRATEGIES:
        raise ParallelError(f"parallel.strategy: '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if sequence * data != world:
        raise ParallelError(
            f"parallel: sequence × data = {sequence} × {data} = {sequence * data} must equal the number of processes "
            f"({world}); launch with torchrun --nproc-per-node {sequence * data} or lcsm train --nproc {sequence * data}"
        )
    if strategy == "hsdp":
        if shard is None or shard < 1 or data % shard:
            raise ParallelError(f"parallel.shard: strategy hsdp needs shard, a divisor of data = {data} (got {shard})")
    elif shard is not None:
        raise ParallelError(f"parallel.shard: only applies with strategy: hsdp (here strategy is '{strategy}')")


def init_grid(sequence: int = 1, data: int | None = None, backend: str | None = None, timeout_s: float | None = None,
              strategy: str = "ddp", shard: int | None = None) -> Grid:
    """Join (or start) the default process group and build the device mesh.

    Reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) when no group exists yet;
    data defaults to world / sequence. Every rank must call this with the same arguments.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if sequence * (data or 1) != 1:
                raise ParallelError(
                    f"parallel: {sequence * (data or 1)} processes asked for but this is a single process; "
                    "launch with torchrun or lcsm train --nproc N"
                )
            return Grid(1, 0, 1, 1, 0, 0, strategy)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if timeout_s is None:
            dist.init_process_group(backend)
        else:
            from datetime import timedelta

            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    data = data or max(1, world // sequence)
    check_sizes(sequence, data, world, strategy, shard)
    shape = mesh_shape(sequence, data, strategy, shard)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    # collective: every rank builds the same mesh and its sub-groups, in the same order
    mesh = init_device_mesh(device, shape, mesh_dim_names=DIMS)
    # DeviceMesh._flatten / _concatenate are how torch builds a group spanning several dims
    # (torchtitan does the same); the flattened meshes are kept here, not sliced from the root
    sub = {"sp": mesh["sp"], "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
           "dp_shard_sp": mesh["dp_shard", "sp"]._flatten("dp_shard_sp")}
    sub["fsdp"] = sub["dp_shard_sp"]
    if strategy == "hsdp":  # (older torch has no _concatenate; it slices the flattened dim from the root)
        join = getattr(DeviceMesh, "_concatenate", None)
        sub["fsdp"] = join([mesh["dp_replicate"], sub["dp_shard_sp"]]) if join else mesh["dp_replicate", "dp_shard_sp"]
    r, f, s = mesh.get_coordinate()
    return Grid(world, rank, sequence, data, s, r * shape[1] + f, strategy, shape[1], mesh, sub)


def run_torchrun(cmd: list[str]) -> int:
    """Run a torchrun command line and wait for it. Ctrl-C reaches torchrun from the terminal (same
    process group) and torchrun stops its workers with SIGTERM, which the trainer treats like
    Ctrl-C (save, then exit); this process only waits, so that torchrun is never killed under its
    workers (they run in their own session and would be left behind)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
