"""Tasks: data for training and evaluation, as blocks of (inputs, labels) token tensors.

Each task is one module holding its recipe section (a pydantic class, `kind: NAME`) beside its
generator; this module is their registry. The shared pieces (Segment, TaskData, seeds, caching,
the batch order) are in lcsm/tasks/base.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Union

from pydantic import Field

from lcsm.tasks import copying, corpus, induction, mqar, text
from lcsm.tasks.base import (IGNORE, Batch, Batches, Segment, TaskData, TaskError, derive_seed, epoch_batches,
                             sample_without_replacement, steps_per_epoch)

# kind -> (its recipe section, its builder)
TASKS = {
    "mqar": (mqar.MQARTask, mqar.build),
    "selective_copying": (copying.CopyingTask, copying.build),
    "induction": (induction.InductionTask, induction.build),
    "text": (text.TextTask, text.build),
    "corpus": (corpus.CorpusTask, corpus.build),
}

Task = Annotated[Union[tuple(cls for cls, _ in TASKS.values())], Field(discriminator="kind")]


def build_task(task, seed: int, run_dir: Path | None = None, log: Callable[[str], None] = lambda s: None, train: bool = True) -> TaskData:
    """Build the data of a task section of a recipe (one of the classes in TASKS).

    train=False skips the training split where that saves work (evaluation)."""
    return TASKS[task.kind][1](task, seed, run_dir=run_dir, log=log, train=train)


__all__ = ["IGNORE", "Batch", "Batches", "Segment", "TaskData", "TaskError", "Task", "TASKS", "build_task", "derive_seed", "epoch_batches",
           "sample_without_replacement", "steps_per_epoch"]
