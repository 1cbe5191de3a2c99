"""Checkpoint IO: the one reader and writer of RUN/checkpoint/.

    RUN/checkpoint/step-000120/model.safetensors   the weights (metadata: step)
                               trainer.pt          optimizer, scheduler, RNG states, step, data position
                                                   (plain tensors and containers, loaded with weights_only=True)
                               manifest.json       {"format": 1, "step", "files": {name: {"bytes", "sha256"}}}
    RUN/checkpoint/init/model.safetensors          an *init checkpoint*: weights to start a run from with a
                        manifest.json              fresh optimizer (metadata and manifest: "init", what made
                                                   it, e.g. "upcycle"; step 0; no trainer.pt)
    RUN/checkpoint/model.safetensors, trainer.pt   the flat layout of runs written before step folders
                                                   (read and resumed from; never written); a flat
                                                   model.safetensors with "init" in its metadata and no
                                                   trainer.pt is an init checkpoint of that layout

Writing: the files go into step-N.partial/ (init.partial/), each written and fsynced, then
manifest.json with their sizes and SHA-256; the folder is renamed to step-N (init) and verified
(every file read back against the manifest) before any older checkpoint is removed; the newest
`keep` step folders are kept (the init checkpoint is not one of them: it stays). A crash at any
moment leaves the previous checkpoints as they were.

Reading: the newest checkpoint that verifies and loads; a newer one that does not is reported
and kept aside (step-N.unreadable), never deleted. When none can be read, the error names the
file and what is wrong with it, and nothing is touched. An init checkpoint is not resumed from
(it has no trainer state): `lcsm train --init-from` and `--resume auto` on a run directory that
has no step checkpoint start from it (init_weights, load_weights); `lcsm eval`, `generate`,
`export`, `upcycle` and `--init-from` take a run's weights through find_weights, which falls
back to the init checkpoint when the run has no step checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lcsm.config.base import RecipeError
from lcsm.run import files

FORMAT = 1
WEIGHTS, TRAINER, MANIFEST = "model.safetensors", "trainer.pt", "manifest.json"
INIT = "init"  # RUN/checkpoint/init/: the init checkpoint
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(RecipeError):
    """No checkpoint of a run can be read, or one cannot be written; str() names the file."""


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # (not on every platform)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file beside path, fsync it, rename it over path: a reader sees
    the old file or the new one, never a part."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- the checkpoints of a run


@dataclass
class Checkpoint:
    """One checkpoint of a run: a step folder (with a manifest), or the legacy flat files."""

    folder: Path  # step-N/ (init/), or RUN/checkpoint/ itself for the legacy layout
    step: int | None  # from the folder name; legacy: from the weights' metadata (None if unreadable)
    legacy: bool = False
    init: str | None = None  # an init checkpoint: what made it ("upcycle"); it has no trainer state

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def trainer(self) -> Path:
        return self.folder / TRAINER

    @property
    def name(self) -> str:
        if self.legacy:
            return f"{self.folder.name}/ (flat {'init weights' if self.init else 'files'})"
        return f"{self.folder.parent.name}/{self.folder.name}"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every checkpoint of a run that a resume can continue (step folders, the legacy flat one),
    newest first (by step; the legacy one by its weights' step). The init checkpoint is not one
    of them: init_checkpoint."""
    folder = checkpoint_dir(run_dir)
    out = []
    if folder.is_dir():
        for sub in folder.iterdir():
            m = _STEP.match(sub.name)
            if m and sub.is_dir():
                out.append(Checkpoint(sub, int(m.group(1))))
        if ((folder / WEIGHTS).exists() or (folder / TRAINER).exists()) and _flat_init(folder) is None:
            out.append(Checkpoint(folder, _weights_step(folder / WEIGHTS), legacy=True))
    return sorted(out, key=lambda c: -1 if c.step is None else c.step, reverse=True)


def init_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The init checkpoint of a run (checkpoint/init/, or the flat init weights of the layout
    before step folders), or None; nothing is verified here (verify)."""
    folder = checkpoint_dir(run_dir)
    if (folder / INIT).is_dir():
        try:
            made_by = str(json.loads((folder / INIT / MANIFEST).read_text()).get("init") or INIT)
        except (OSError, ValueError, AttributeError):
            made_by = INIT  # (verify says what is wrong with it)
        return Checkpoint(folder / INIT, 0, init=made_by)
    made_by = _flat_init(folder)
    return Checkpoint(folder, 0, legacy=True, init=made_by) if made_by is not None else None


def _flat_init(folder: Path) -> str | None:
    """What made the flat init weights in folder (a model.safetensors with "init" in its metadata
    and no trainer.pt beside it: `lcsm upcycle` before step folders), or None."""
    if (folder / TRAINER).exists() or not (folder / WEIGHTS).is_file():
        return None
    try:
        return weights_metadata(folder / WEIGHTS).get("init")
    except Exception:
        return None


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint (by its name; nothing is loaded), None without one. (A
    sharded run's checkpoint is lcsm/run/dcp.py's: dcp.newest_step counts both.)"""
    found = list_checkpoints(run_dir)
    return found[0].step if found else None


def _weights_step(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step", -1))
    except Exception:
        return None


def verify(ckpt: Checkpoint) -> str | None:
    """What is wrong with a checkpoint's files (missing, wrong size, wrong checksum), or None.
    A legacy checkpoint has no manifest: only that its files exist is checked here. An init
    checkpoint has weights and no trainer state."""
    needed = (WEIGHTS,) if ckpt.init else (WEIGHTS, TRAINER)
    if ckpt.legacy:
        missing = [name for name in needed if not (ckpt.folder / name).exists()]
        return f"{ckpt.folder / missing[0]}: missing" if missing else None
    try:
        manifest = json.loads((ckpt.folder / MANIFEST).read_text())
        listed = manifest["files"]
        if int(manifest["step"]) != ckpt.step:
            return f"{ckpt.folder / MANIFEST}: says step {manifest['step']}, the folder step {ckpt.step}"
    except FileNotFoundError:
        return f"{ckpt.folder / MANIFEST}: missing (the checkpoint was not finished)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{ckpt.folder / MANIFEST}: unreadable ({type(e).__name__})"
    for name in needed:
        if name not in listed:
            return f"{ckpt.folder / MANIFEST}: does not list {name}"
    for name, entry in listed.items():
        path = ckpt.folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path}: missing"
        if size != entry.get("bytes"):
            return f"{path}: {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)"
        if sha256(path) != entry.get("sha256"):
            return f"{path}: its SHA-256 differs from the manifest's (the file is corrupt)"
    return None


# --------------------------------------------------------------------------- saving


def _write_folder(run_dir: Path, final: Path, writes: list, manifest: dict) -> None:
    """Write a checkpoint folder: each (name, write(path)) into final.partial/, fsynced, then the
    manifest (manifest's fields and the files' sizes and SHA-256); renamed to final (a folder
    already there is kept aside as final.replaced). Claims both names in the lcsm-files manifest
    first. Raises CheckpointError when it cannot be written (nothing else is then touched)."""
    parent = final.parent
    partial = parent / f"{final.name}.partial"
    files.claim(run_dir, "checkpoint", f"checkpoint/{final.name}", f"checkpoint/{partial.name}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # a save cut short earlier: lcsm's own temporary folder
        partial.mkdir()
        listed = {}
        for name, write in writes:
            path = partial / name
            write(str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            listed[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        write_text(partial / MANIFEST, json.dumps({"format": FORMAT, **manifest, "files": listed}, indent=1) + "\n")
        if final.exists():  # the same step saved again (after a fallback): keep the earlier one aside
            os.replace(final, aside_path(final, "replaced"))
        os.replace(partial, final)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)  # lcsm's own temporary folder
        raise CheckpointError(
            f"{final}: cannot write the checkpoint ({e.strerror or e}); the earlier checkpoints are kept as they were"
        ) from None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of state["step"] (weights, optimizer, scheduler, RNG states, state),
    verify it, then drop the step checkpoints older than the newest `keep`. Returns its folder.
    Raises CheckpointError when it cannot be written (the previous ones are then untouched)."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    step = int(state["step"])
    final = checkpoint_dir(run_dir) / f"step-{step:06d}"
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **state}
    _write_folder(run_dir, final, [(WEIGHTS, lambda p: save_model(model, p, metadata={"step": str(step)})),
                                   (TRAINER, lambda p: torch.save(trainer, p))], {"step": step})
    problem = verify(Checkpoint(final, step))
    if problem:
        raise CheckpointError(f"{problem}: the checkpoint just written does not verify; the earlier ones are kept")
    _prune(run_dir, keep)
    return final


def save_init_weights(run_dir: Path, model, made_by: str, extra: dict | None = None) -> Path:
    """Write RUN/checkpoint/init/ as an init checkpoint: model.safetensors (metadata: step 0,
    init = made_by, and extra) and its manifest, verified; no trainer state. Returns the weights."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir) / INIT
    metadata = {"step": "0", "init": made_by, **{k: str(v) for k, v in (extra or {}).items()}}
    _write_folder(run_dir, final, [(WEIGHTS, lambda p: save_model(model, p, metadata=metadata))], {"step": 0, "init": made_by})
    problem = verify(Checkpoint(final, 0, init=made_by))
    if problem:
        raise CheckpointError(f"{problem}: the init checkpoint just written does not verify")
    return final / WEIGHTS


def save_weights(model, path: Path, step: int) -> None:
    """Write a model's weights as one safetensors file (metadata: step), atomically (lcsm export --out)."""
    from safetensors.torch import save_model

    atomic_write(Path(path), lambda tmp: save_model(model, tmp, metadata={"step": str(step)}))


def remove_checkpoint_folder(folder: Path) -> None:
    """Remove one checkpoint folder lcsm wrote: the files its manifest.json lists, the manifest and
    lcsm's temporary files; the folder itself only if nothing else is in it (the user's stays)."""
    try:
        listed = list(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = [WEIGHTS, TRAINER]
    for name in [*listed, MANIFEST]:
        if "/" not in name and name not in ("..", "."):
            (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something of the user's is in it


def remove_checkpoint_files(target: Path) -> bool:
    """For --overwrite: remove a checkpoint folder lcsm wrote (step-N, step-N.partial, init,
    init.partial) as remove_checkpoint_folder does. Returns False when target is not one (nothing done)."""
    sharded = target.name in ("dcp", "dcp.tmp", "dcp.old", "dcp.prev") or target.name.startswith("dcp.unreadable")
    if target.parent.name == "checkpoint" and sharded and target.is_dir():
        shutil.rmtree(target)  # a sharded checkpoint (lcsm/run/dcp.py): DCP's files, all written for lcsm
        return True
    is_init = target.name in (INIT, f"{INIT}.partial")
    if target.parent.name != "checkpoint" or not (target.name.startswith("step-") or is_init) or not target.is_dir():
        return False
    remove_checkpoint_folder(target)
    return True


def aside_path(folder: Path, why: str) -> Path:
    """A free name beside `folder` to keep it aside under: NAME.why, else NAME.why-2, -3, ..."""
    target = folder.with_name(f"{folder.name}.{why}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.{why}-{n}")
    return target


def remove_replicated(run_dir: Path) -> None:
    """Remove every step checkpoint of a run (a sharded run's checkpoint has replaced them)."""
    _prune(run_dir, 0)


def _prune(run_dir: Path, keep: int) -> None:
    """Remove the checkpoints beyond the newest `keep` (the newest is verified by the caller)."""
    for old in list_checkpoints(run_dir)[keep:]:
        if old.legacy:
            for path in (old.weights, old.trainer):
                path.unlink(missing_ok=True)
        else:
            remove_checkpoint_folder(old.folder)


# --------------------------------------------------------------------------- loading


def _read(ckpt: Checkpoint, model, device: torch.device) -> dict:
    """Load ckpt's weights into model; return its trainer state. Raises ValueError(problem)."""
    from safetensors.torch import load_model

    problem = verify(ckpt)
    if problem:
        raise ValueError(problem)
    try:
        trainer = torch.load(ckpt.trainer, weights_only=True, map_location="cpu")
        step = int(trainer["step"])
    except Exception as e:
        raise ValueError(f"{ckpt.trainer}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    model_step = _weights_step(ckpt.weights)
    if model_step is None:
        raise ValueError(f"{ckpt.weights}: cannot be read (not a safetensors file, or cut short)")
    if model_step != step:
        raise ValueError(f"{ckpt.weights} (step {model_step}) and {ckpt.trainer.name} (step {step}) do not match "
                         "(the run was stopped while saving)")
    try:
        load_model(model, str(ckpt.weights), device=str(device))
    except Exception as e:
        raise ValueError(f"{ckpt.weights}: does not fit the model of config.yaml ({_first_line(e)})") from None
    return trainer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, device: torch.device,
                    log: Callable[[str], None] | None = None, set_aside: bool = True) -> dict:
    """Resume from the newest readable checkpoint of a run; returns the trainer state saved with
    it. A newer checkpoint that cannot be read is reported through log and (set_aside: rank 0
    only, under a process grid) renamed step-N.unreadable: kept, never deleted, and out of the
    way of the step-N the resumed run writes again. Raises CheckpointError when none can be read."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no checkpoint to resume from")
    problems = []
    for ckpt in found:
        try:
            trainer = _read(ckpt, model, device)
        except ValueError as e:
            problems.append((ckpt, str(e)))
            continue
        try:
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            torch.set_rng_state(trainer["rng"]["torch"])
        except Exception as e:
            problems.append((ckpt, f"{ckpt.trainer}: does not fit this optimizer ({_first_line(e)})"))
            continue
        if "cuda" in trainer["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
        for bad, why in problems:
            kept = bad.folder
            if set_aside and not bad.legacy:
                try:
                    kept = aside_path(bad.folder, "unreadable")
                    os.replace(bad.folder, kept)
                except OSError:
                    kept = bad.folder  # (a read-only run: it stays where it is, and is still skipped)
            if log is not None:
                log(f"checkpoint {bad.name} cannot be read: {why}; resuming from the previous one, step {trainer['step']} "
                    f"(the unreadable one is kept as {kept})")
        return trainer
    detail = "; ".join(why for _, why in problems)
    raise CheckpointError(
        f"{run_dir}: cannot resume, {'no checkpoint can be read' if len(problems) > 1 else 'its checkpoint cannot be read'}: {detail}. "
        "Nothing was changed or deleted; restore the file, or pass --overwrite to start over"
    )


def find_weights(path: str | Path, log: Callable[[str], None] | None = None) -> tuple[Path, int]:
    """(weights file, step): the one way to a run's weights, for `lcsm eval`, `generate`,
    `export` (and the Hugging Face export), `upcycle` and `lcsm train --init-from`. path is a run
    directory or its checkpoint/ folder (the newest step checkpoint that verifies; without one
    the init checkpoint, step 0), one step-N/ or init/ folder, or a model.safetensors file. A
    newer checkpoint that does not verify is reported through log and passed over. Raises
    CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.is_file():
        step = _weights_step(path)
        if step is None:
            raise CheckpointError(f"{path}: not a readable safetensors file")
        return path, step
    single = None
    if _STEP.match(path.name) and (path / WEIGHTS).exists():
        single = Checkpoint(path, int(_STEP.match(path.name).group(1)))
    elif path.name == INIT and path.parent.name == "checkpoint" and path.is_dir():
        single = init_checkpoint(path.parent.parent)
    if single is not None:
        problem = verify(single)
        if problem:
            raise CheckpointError(problem)
        return single.weights, single.step
    run_dir = path.parent if path.name == "checkpoint" and not (path / "checkpoint").exists() else path
    found = list_checkpoints(run_dir)
    init = init_checkpoint(run_dir)
    if not found and init is None and (path / WEIGHTS).exists():  # a folder holding a bare model.safetensors
        return find_weights(path / WEIGHTS)
    problems = []
    for ckpt in [*found, *([init] if init is not None else [])]:
        # the flat layout has no manifest, and evaluation needs only the weights
        problem = verify(ckpt) if not ckpt.legacy else (None if ckpt.weights.exists() else f"{ckpt.weights}: missing")
        step = _weights_step(ckpt.weights) if problem is None else None
        if problem is None and step is None:
            problem = f"{ckpt.weights}: cannot be read (not a safetensors file, or cut short)"
        if problem is None:
            for _, why in problems:
                if log is not None:
                    log(f"{why}; using the previous checkpoint, step {step}" + (" (the init weights)" if ckpt.init else ""))
            return ckpt.weights, step
        problems.append((ckpt, problem))
    if problems:
        raise CheckpointError("; ".join(why for _, why in problems) + ": no readable checkpoint")
    raise CheckpointError(f"{path}: no checkpoint here (looked for checkpoint/step-*/{WEIGHTS}, checkpoint/{INIT}/{WEIGHTS} "
                          f"and checkpoint/{WEIGHTS})")


def weights_run_dir(weights: Path) -> Path | None:
    """The run directory a model.safetensors belongs to: the folder with config.yaml beside it or
    up to two folders above (RUN/checkpoint/step-N/model.safetensors)."""
    weights = Path(weights)
    return next((p for p in (weights.parent, weights.parent.parent, weights.parent.parent.parent)
                 if (p / "config.yaml").exists()), None)


def weights_metadata(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return dict(f.metadata() or {})


def init_weights(run_dir: Path) -> Path | None:
    """The weights of RUN's init checkpoint (see the module docstring), verified against its
    manifest; None when it has none. Raises CheckpointError when it does not verify."""
    ckpt = init_checkpoint(run_dir)
    if ckpt is None:
        return None
    problem = verify(ckpt)
    if problem:
        raise CheckpointError(f"{problem}: the run's init checkpoint cannot be read; nothing was changed")
    return ckpt.weights


def load_weights(model, weights: Path, device: torch.device, flag: str = "--init-from") -> int:
    """Load a model.safetensors into `model` (every tensor, shapes equal); returns its step (-1 if
    unknown). Raises RecipeError naming `flag` when the weights do not fit the model."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(weights), device=str(device))
        step = int(weights_metadata(weights).get("step", -1))
    except Exception as e:
        first = str(e).strip().splitlines()
        raise RecipeError(f"{flag} {weights}: the weights do not fit the recipe's model ({' '.join(first[:3])[:400]})") from None
    return step
