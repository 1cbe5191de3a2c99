"""Scale-out on torch.distributed: the device mesh (grid.py), sequence parallelism (LASP-2 /
LASP-2H: context.py, lasp.py) and data parallelism on torch's DDP / FSDP2 (data.py). See docs/parallel.md."""

from .context import SequenceParallel, current, distributed, sequence_parallel
from .grid import Grid, init_grid

__all__ = ["SequenceParallel", "current", "distributed", "sequence_parallel", "Grid", "init_grid"]
