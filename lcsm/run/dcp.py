"""Sharded checkpoints through torch.distributed.checkpoint (DCP), for runs whose weights are split
over the ranks (parallel.strategy fsdp or hsdp). Replicated runs (one process, ddp) keep the
safetensors checkpoint of lcsm/run/checkpoint.py; a run may change between the two on resume.

    RUN/checkpoint/dcp/         one complete checkpoint
        .metadata, __R_0.distcp   DCP: the model and the optimizer (keyed by parameter name, each rank
                                  writes its own shards), rank 0's RNG, and the trainer state (step,
                                  data position, scheduler, log window, last eval) as JSON
        lcsm.json                 {"step", "world", "strategy"}: readable without torch.distributed

Written atomically: every rank writes into dcp.tmp/, then rank 0 swaps it in (dcp -> dcp.old,
dcp.tmp -> dcp, remove dcp.old); a crash between the two renames leaves dcp.old, which is read
then. On a multi-node run RUN must be on a filesystem every node sees.

Reads on any world size: DCP reshards on load, into a sharded model on another mesh or into whole
tensors (one process, ddp); `lcsm eval` and `lcsm export` read the weights in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from lcsm.config.base import RecipeError
from lcsm.run import files
from lcsm.run.checkpoint import latest_step, remove_replicated

FOLDER, TMP, OLD = "dcp", "dcp.tmp", "dcp.old"
INFO = "lcsm.json"


# --------------------------------------------------------------------------- where


def sharded_dir(run_dir: Path) -> Path | None:
    """The complete sharded checkpoint of a run (dcp/, or dcp.old/ after a crash mid-swap), or None."""
    folder = Path(run_dir) / "checkpoint"
    for name in (FOLDER, OLD):
        d = folder / name
        if (d / INFO).exists() and (d / ".metadata").exists():
            return d
    return None


def sharded_step(run_dir: Path) -> int | None:
    """The step of the run's sharded checkpoint, or None when there is none (or it cannot be read)."""
    d = sharded_dir(run_dir)
    if d is None:
        return None
    try:
        return int(json.loads((d / INFO).read_text())["step"])
    except Exception:
        return None


def newest_step(run_dir: Path) -> int | None:
    """The step of the run's newest checkpoint, sharded or replicated; None without one."""
    steps = [s for s in (sharded_step(run_dir), latest_step(run_dir)) if s is not None]
    return max(steps) if steps else None


def newest_is_sharded(run_dir: Path) -> bool:
    """True when the run's newest checkpoint is a sharded one. Saving one format removes the other;
    both are there only after a crash between the two, and then the newer is the one to read."""
    step = sharded_step(run_dir)
    if step is None:
        return False
    other = latest_step(run_dir)
    return other is None or step >= other


def find(path: Path) -> tuple[Path, Path] | None:
    """(run_dir, checkpoint folder) when `path` — a run directory, its checkpoint/ folder or the
    dcp/ folder itself — holds a sharded checkpoint that is the run's newest."""
    path = Path(path)
    if not path.is_dir():
        return None
    for run_dir in (path, path.parent, path.parent.parent):
        if (run_dir / "config.yaml").exists() and newest_is_sharded(run_dir):
            d = sharded_dir(run_dir)
            if path in (run_dir, run_dir / "checkpoint", d):
                return run_dir, d
    return None


def remove(run_dir: Path) -> None:
    """Remove the run's sharded checkpoint (rank 0, after a replicated one has been written)."""
    for name in (FOLDER, OLD, TMP):
        d = Path(run_dir) / "checkpoint" / name
        if d.is_dir():
            shutil.rmtree(d)


# --------------------------------------------------------------------------- writing


def _rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save(run_dir: Path, model, optimizer, scheduler, state: dict, strategy: str | None = None) -> None:
    """Every rank: write the checkpoint of a sharded run (collective). state: the trainer's plain
    data (step, data position, ...), JSON-serialisable; strategy: for lcsm.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / "checkpoint"
    tmp = folder / TMP
    main = dist.get_rank() == 0
    if main:
        files.claim(Path(run_dir), "checkpoint", *(f"checkpoint/{n}" for n in (FOLDER, TMP, OLD)))
        folder.mkdir(exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a write that did not finish
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainer = json.dumps({"state": state, "scheduler": scheduler.state_dict()})
    dcp.save({"model": model_sd, "optimizer": optim_sd, "rng": _rng(), "trainer": trainer}, checkpoint_id=str(tmp))
    if main:
        (tmp / INFO).write_text(json.dumps({"step": state["step"], "world": dist.get_world_size(), "strategy": strategy,
                                            "format": "torch.distributed.checkpoint"}) + "\n")
        final, old = folder / FOLDER, folder / OLD
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
        remove_replicated(run_dir)  # the replicated checkpoints of an earlier part of the run
    dist.barrier()  # no rank goes on (or stops) before the checkpoint is in place


# --------------------------------------------------------------------------- reading


def _read(d: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=str(d))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{d}: cannot read the checkpoint ({first}); pass --overwrite to start over") from None


def load(run_dir: Path, model, optimizer, scheduler) -> dict:
    """Every rank (collective when torch.distributed is up): read the run's sharded checkpoint into
    `model` and `optimizer` — sharded on any mesh, or whole (one process, ddp) — and the scheduler
    and RNG. Returns the trainer state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    d = sharded_dir(run_dir)
    saved = FileSystemReader(str(d)).read_metadata().state_dict_metadata
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the templates DCP fills in, in this run's layout
    rng = {k: v for k, v in _rng().items() if f"rng.{k}" in saved}  # a CPU run's checkpoint has no CUDA RNG
    state = {"model": model_sd, "optimizer": optim_sd, "rng": rng, "trainer": ""}
    _read(d, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = json.loads(state["trainer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return trainer["state"]


def load_weights(d: Path, model) -> int:
    """One process: the weights of the sharded checkpoint in folder d into a whole `model`; returns the step."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    _read(d, state)
    set_model_state_dict(model, state["model"])
    return int(json.loads((d / INFO).read_text())["step"])


def copy_full(source, source_optimizer, model, optimizer) -> None:
    """The state of a whole (unsharded) model and its optimizer into a sharded model and optimizer
    (a replicated checkpoint resumed by a sharded run): every rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model_sd, optim_sd = get_state_dict(source, source_optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
