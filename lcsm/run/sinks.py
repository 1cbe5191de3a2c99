"""Where a run's metrics go: RUN/metrics.jsonl always, and TensorBoard and Weights & Biases when a
recipe asks (`log: [jsonl, tensorboard, wandb]`).

Every sink gets the same records, the ones metrics.jsonl holds ({"split": "train" | "eval",
"step", ...}); the scalars of a record are flattened into tags `split/name` (an eval's slices as
`eval/<slice>/name`). metrics.jsonl stays the run's record (lcsm plot, resume, ablation reports
read it); the others are views of it:

    tensorboard   RUN/tensorboard/ (torch.utils.tensorboard; needs the `tensorboard` package). A
                  resumed run purges the events logged after its checkpoint, as metrics.jsonl is.
    wandb         offline (RUN/wandb/, `wandb sync` uploads it) unless WANDB_MODE says otherwise;
                  project WANDB_PROJECT or "lcsm"; one run id per run directory, resumed with it.

A sink whose package is not installed is left out with a note: the run does not depend on a viewer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from lcsm.run import files

SINKS = ("jsonl", "tensorboard", "wandb")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record as flat tags: {"train/loss": ..., "eval/seq_len=64/accuracy": ...}."""
    split = record.get("split", "train")
    out = {}
    for key, value in record.items():
        if key in ("split", "step"):
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{split}/{key}"] = float(value)
        elif key == "slices" and isinstance(value, dict) and len(value) > 1:
            for name, row in value.items():
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"{split}/{name}/{k}"] = float(v)
    return out


class Sinks:
    """The metric sinks of one run (on the main process; the others pass enabled=False).

    names: the recipe's `log` list (jsonl is always there); resume_step: the checkpoint's step when
    resuming (later events are dropped), else None; config: the resolved recipe (wandb's config);
    say: where notes go (a sink left out)."""

    def __init__(self, run_dir: Path, names, *, run_name: str, config: dict | None = None, resume_step: int | None = None,
                 enabled: bool = True, say: Callable[[str], None] = lambda s: None):
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer imports the tensorboard package
                say("log: tensorboard is not installed (pip install 'lcsm[tensorboard]'); logging to metrics.jsonl only")
            else:
                purge = None if resume_step is None else resume_step + 1
                files.claim(run_dir, "tensorboard")  # (lcsm/run/files.py: a folder lcsm's sink fills)
                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                say("log: wandb is not installed (pip install 'lcsm[wandb]'); logging to metrics.jsonl only")
            else:
                # offline unless configured; one id per run directory, so a resumed run continues it
                files.claim(run_dir, "wandb")
                run_id = "lcsm-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "lcsm"), name=run_name, id=run_id,
                                        dir=str(run_dir), config=config or {}, resume="allow",
                                        mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def write(self, record: dict) -> None:
        """One record to every sink (metrics.jsonl first, flushed: it is the run's record)."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        step = record.get("step", 0)
        values = scalars(record) if (self.tensorboard is not None or self.wandb is not None) else {}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl = self.tensorboard = self.wandb = None
