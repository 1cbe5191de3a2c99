"""The process grid: world = sequence × data, sequence ranks contiguous (they talk every layer)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .context import SequenceParallel


class ParallelError(ValueError):
    """Parallel settings that do not fit the world or the batch; str() is the message for the user."""


@dataclass
class Grid:
    world: int
    rank: int
    sequence: int  # S: ranks that share one sequence
    data: int  # D: groups of ranks that see different rows of the batch
    sp_rank: int
    dp_rank: int
    sp_group: object = None
    dp_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def check_sizes(sequence: int, data: int, world: int) -> None:
    if sequence < 1 or data < 1:
        raise ParallelError(f"parallel.sequence and parallel.data must be >= 1 (got {sequence}, {data})")
    if sequence * data != world:
        raise ParallelError(
            f"parallel: sequence × data = {sequence} × {data} = {sequence * data} must equal the number of processes "
            f"({world}); launch with torchrun --nproc-per-node {sequence * data} or lcsm train --nproc {sequence * data}"
        )


def init_grid(sequence: int = 1, data: int | None = None, backend: str | None = None, timeout_s: float | None = None) -> Grid:
    """Join (or start) the default process group and build the sequence and data groups.

    Reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) when no group exists yet;
    data defaults to world / sequence. Every rank must call this with the same arguments.
    """
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if sequence * (data or 1) != 1:
                raise ParallelError(
                    f"parallel: {sequence * (data or 1)} processes asked for but this is a single process; "
                    "launch with torchrun or lcsm train --nproc N"
                )
            return Grid(1, 0, 1, 1, 0, 0)
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
    check_sizes(sequence, data, world)
    sp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order
    for d in range(data):
        ranks = list(range(d * sequence, (d + 1) * sequence))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group = group
    for s in range(sequence):
        ranks = list(range(s, world, sequence))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return Grid(world, rank, sequence, data, rank % sequence, rank // sequence, sp_group, dp_group)


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
