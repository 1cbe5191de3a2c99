"""Scale-out on torch.distributed: the process grid, sequence parallelism (LASP-2 / LASP-2H) and
data parallelism. See docs/parallel.md."""

from .context import SequenceParallel, current, distributed, sequence_parallel
from .grid import Grid, init_grid

__all__ = ["SequenceParallel", "current", "distributed", "sequence_parallel", "Grid", "init_grid"]
