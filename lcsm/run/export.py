"""`lcsm export RUN --out FILE.safetensors`: the weights of a run as one safetensors file.

A sharded run (fsdp, hsdp) checkpoints in pieces, one or more per rank (lcsm/run/dcp.py); the
export reads them whole in one process (DCP reshards on load) and writes the model's state as a
single file, metadata {"step"} as in a replicated run's model.safetensors. A replicated run's
checkpoint exports the same way. Placed beside the run's config.yaml (or in a folder inside the
run directory), the file is what `lcsm eval` and `lcsm generate` read.
"""

from __future__ import annotations

from pathlib import Path

from lcsm.config.base import RecipeError
from lcsm.run.checkpoint import atomic_write
from lcsm.run.evaluate import load_run


def export(run: str | Path, out: str | Path) -> tuple[Path, int]:
    """Write the weights of `run` (a run directory or checkpoint) to `out`; returns (out, step)."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.suffix != ".safetensors":
        raise RecipeError(f"--out {out}: the file must end in .safetensors")
    if out.is_dir():
        raise RecipeError(f"--out {out}: is a directory; give a file name")
    if not out.parent.exists():
        raise RecipeError(f"--out {out}: the folder {out.parent} does not exist")
    _, model, _, step = load_run(run)
    atomic_write(out, lambda tmp: save_model(model, tmp, metadata={"step": str(step)}))
    return out, step
