"""Sharded checkpoints through torch.distributed.checkpoint (DCP), for runs whose weights are split
over the ranks (parallel.strategy fsdp or hsdp). Replicated runs (one process, ddp) keep the
safetensors checkpoint of lcsm/run/checkpoint.py; a run may change between the two on resume.

    RUN/checkpoint/dcp/         the newest complete checkpoint
        .metadata, __R_0.distcp   DCP: the model and the optimizer (keyed by parameter name, each rank
                                  writes its own shards), rank 0's RNG, and the trainer state (step,
                                  data position, scheduler, log window, last eval) as JSON
        lcsm.json                 {"step", "world", "strategy"}: readable without torch.distributed
    RUN/checkpoint/dcp.prev/    the one before it (keep_checkpoints >= 2, the default)

Written atomically: every rank writes into dcp.tmp/, then rank 0 swaps it in (dcp.prev removed,
dcp -> dcp.prev, dcp.tmp -> dcp); a crash between the renames leaves dcp.prev, which is read then.
A checkpoint that cannot be read is set aside as dcp.unreadable (kept, never deleted) and the run
resumes from the previous one, saying so. On a multi-node run RUN must be on a filesystem every
node sees.

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
from lcsm.run.checkpoint import aside_path, latest_step, remove_replicated

FOLDER, TMP, PREV = "dcp", "dcp.tmp", "dcp.prev"
OLD = "dcp.old"  # the swap's spare of earlier lcsm versions: still read
INFO = "lcsm.json"


# --------------------------------------------------------------------------- where


def _step_of(d: Path) -> int | None:
    try:
        return int(json.loads((d / INFO).read_text())["step"])
    except Exception:
        return None


def candidates(run_dir: Path) -> list[Path]:
    """The run's complete sharded checkpoints (lcsm.json and DCP's .metadata present), newest step
    first: dcp/, dcp.prev/ (and an earlier version's dcp.old/ left by a crash mid-swap)."""
    folder = Path(run_dir) / "checkpoint"
    found = [(step, folder / name) for name in (FOLDER, OLD, PREV)
             if (folder / name / ".metadata").exists() and (step := _step_of(folder / name)) is not None]
    return [d for _, d in sorted(found, key=lambda sd: -sd[0])]


def sharded_dir(run_dir: Path) -> Path | None:
    """The newest complete sharded checkpoint of a run, or None."""
    found = candidates(run_dir)
    return found[0] if found else None


def sharded_step(run_dir: Path) -> int | None:
    """The step of the run's newest sharded checkpoint, or None when there is none."""
    d = sharded_dir(run_dir)
    return None if d is None else _step_of(d)


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
    """Remove the run's sharded checkpoints (rank 0, after a replicated one has been written;
    a set-aside dcp.unreadable stays)."""
    for name in (FOLDER, OLD, TMP, PREV):
        d = Path(run_dir) / "checkpoint" / name
        if d.is_dir():
            shutil.rmtree(d)


# --------------------------------------------------------------------------- writing


def _rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save(run_dir: Path, model, optimizer, scheduler, state: dict, strategy: str | None = None, keep: int = 2) -> None:
    """Every rank: write the checkpoint of a sharded run (collective). state: the trainer's plain
    data (step, data position, ...), JSON-serialisable; strategy: for lcsm.json; keep: 1 keeps
    only the new checkpoint, 2 or more also the previous one (dcp.prev, the fallback)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / "checkpoint"
    tmp = folder / TMP
    main = dist.get_rank() == 0
    if main:
        files.claim(Path(run_dir), "checkpoint", *(f"checkpoint/{n}" for n in (FOLDER, TMP, OLD, PREV)))
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
        final, prev, old = folder / FOLDER, folder / PREV, folder / OLD
        # at every moment a complete checkpoint is in place: dcp/, or (between the renames) dcp.prev/
        if final.exists():
            if prev.exists():
                shutil.rmtree(prev)
            final.rename(prev)
        tmp.rename(final)
        for spare in ([old] if keep >= 2 else [old, prev]):
            if spare.exists():
                shutil.rmtree(spare)
        remove_replicated(run_dir)  # the replicated checkpoints of an earlier part of the run
    dist.barrier()  # no rank goes on (or stops) before the checkpoint is in place


# --------------------------------------------------------------------------- reading


class Unreadable(Exception):
    """A sharded checkpoint that DCP cannot read; str() says which folder and why."""


def _read(d: Path, state: dict) -> None:
    """dcp.load of folder d into `state` (collective under torch.distributed: DCP gathers every
    rank's read errors, so all ranks raise together)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, checkpoint_id=str(d))
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        raise Unreadable(f"{d}: cannot read the checkpoint ({_cause(e)})") from None


def _cause(e: BaseException) -> str:
    """The first line of what went wrong; for DCP's CheckpointException, of the first rank's error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))
        e = e[0] if isinstance(e, tuple) else e  # (exception, its stack)
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _agreed(failed: bool) -> bool:
    """True on every rank when any rank failed (one decision for all; a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return failed
    flag = torch.tensor([1.0 if failed else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def _first_readable(run_dir: Path, read, log=None, set_aside: bool = True, doing: str = "resuming from"):
    """read(folder) on the run's sharded checkpoints, newest first, until one succeeds on every
    rank; those that failed are reported through log ("<why>; <doing> the previous checkpoint")
    and (set_aside: rank 0) renamed dcp.unreadable, kept and out of the way. Returns (folder,
    what read returned); raises RecipeError when none can be read (nothing renamed then)."""
    problems = []
    for d in candidates(run_dir):
        try:
            result, why = read(d), None
        except Unreadable as e:
            result, why = None, str(e)
        if _agreed(why is not None):
            problems.append((d, why or f"{d}: cannot be read on another rank"))
            continue
        main = not dist.is_initialized() or dist.get_rank() == 0
        for bad, why in problems:
            kept = bad
            if set_aside and main:
                target = aside_path(bad.with_name(FOLDER), "unreadable")  # dcp.unreadable, whichever failed
                try:
                    files.claim(Path(run_dir), f"checkpoint/{target.name}")
                    bad.rename(target)
                    kept = target
                except OSError:
                    kept = bad  # a read-only run: it stays, and is skipped again next time
            if log is not None and main:
                log(f"{why}; {doing} the previous checkpoint, step {_step_of(d)} (the unreadable one is kept as {kept})")
        if set_aside and dist.is_initialized():
            dist.barrier()  # the renames are done before any rank goes on
        return d, result
    detail = "; ".join(why for _, why in problems) or f"{Path(run_dir) / 'checkpoint'}: no sharded checkpoint"
    raise RecipeError(f"{run_dir}: no sharded checkpoint can be read: {detail}. Nothing was changed or deleted; "
                      "restore the files, or pass --overwrite to start over")


def load(run_dir: Path, model, optimizer, scheduler, log=None, set_aside: bool = True) -> dict:
    """Every rank (collective when torch.distributed is up): read the run's newest readable sharded
    checkpoint into `model` and `optimizer` — sharded on any mesh, or whole (one process, ddp) —
    and the scheduler and RNG. A newer one that cannot be read is reported through log and set
    aside (see _first_readable). Returns the trainer state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def read(d: Path) -> dict:
        saved, why = None, None
        try:
            saved = FileSystemReader(str(d)).read_metadata().state_dict_metadata
        except Exception as e:
            why = f"{d}: cannot read the checkpoint's metadata ({type(e).__name__})"
        # agreed before dcp.load's collectives: a rank must not leave for the next candidate alone
        if _agreed(why is not None):
            raise Unreadable(why or f"{d}: cannot read the checkpoint's metadata on another rank")
        model_sd, optim_sd = get_state_dict(model, optimizer)  # the templates DCP fills in, in this run's layout
        rng = {k: v for k, v in _rng().items() if f"rng.{k}" in saved}  # a CPU run's checkpoint has no CUDA RNG
        state = {"model": model_sd, "optimizer": optim_sd, "rng": rng, "trainer": ""}
        _read(d, state)
        return state

    _, state = _first_readable(run_dir, read, log, set_aside)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = json.loads(state["trainer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return trainer["state"]


def load_weights(d: Path, model, log=None) -> int:
    """One process: the weights of a sharded checkpoint into a whole `model`; returns the step.
    d: one checkpoint folder (read as it is), or a run directory (its newest readable sharded
    checkpoint; a newer unreadable one is reported through log and left where it is)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    def read(folder: Path) -> dict:
        state = {"model": get_model_state_dict(model)}
        _read(folder, state)
        return state

    d = Path(d)
    if (d / INFO).exists():
        try:
            state = read(d)
        except Unreadable as e:
            raise RecipeError(f"{e}; pass the run directory to use its previous checkpoint") from None
        folder = d
    else:
        folder, state = _first_readable(d, read, log, set_aside=False, doing="using")
    set_model_state_dict(model, state["model"])
    return int(json.loads((folder / INFO).read_text())["step"])


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
