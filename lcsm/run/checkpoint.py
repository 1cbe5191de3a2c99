"""Checkpoint IO: the one reader and writer of RUN/checkpoint/.

    RUN/checkpoint/step-000120/model.safetensors   the weights (metadata: step)
                               trainer.pt          optimizer, scheduler, RNG states, step, data position
                                                   (plain tensors and containers, loaded with weights_only=True)
                               manifest.json       {"format": 1, "step", "files": {name: {"bytes", "sha256"}}}
    RUN/checkpoint/model.safetensors, trainer.pt   the flat layout of runs written before step folders
                                                   (read and resumed from; never written)

Writing: the files go into step-N.partial/, each written and fsynced, then manifest.json with
their sizes and SHA-256; the folder is renamed to step-N and verified (every file read back
against the manifest) before any older checkpoint is removed; the newest `keep` are kept. A
crash at any moment leaves the previous checkpoints as they were.

Reading: the newest checkpoint that verifies and loads; a newer one that does not is reported
and kept aside (step-N.unreadable), never deleted. When none can be read, the error names the
file and what is wrong with it, and nothing is touched.
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

    folder: Path  # step-N/, or RUN/checkpoint/ itself for the legacy layout
    step: int | None  # from the folder name; legacy: from the weights' metadata (None if unreadable)
    legacy: bool = False

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def trainer(self) -> Path:
        return self.folder / TRAINER

    @property
    def name(self) -> str:
        return f"{self.folder.parent.name}/{self.folder.name}" if not self.legacy else f"{self.folder.name}/ (flat files)"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every checkpoint of a run, newest first (by step); the legacy flat one is ordered by its step."""
    folder = checkpoint_dir(run_dir)
    out = []
    if folder.is_dir():
        for sub in folder.iterdir():
            m = _STEP.match(sub.name)
            if m and sub.is_dir():
                out.append(Checkpoint(sub, int(m.group(1))))
        if (folder / WEIGHTS).exists() or (folder / TRAINER).exists():
            out.append(Checkpoint(folder, _weights_step(folder / WEIGHTS), legacy=True))
    return sorted(out, key=lambda c: -1 if c.step is None else c.step, reverse=True)


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint (by its name; nothing is loaded), None without one."""
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
    A legacy checkpoint has no manifest: only that its files exist is checked here."""
    if ckpt.legacy:
        missing = [p.name for p in (ckpt.weights, ckpt.trainer) if not p.exists()]
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
    for name in (WEIGHTS, TRAINER):
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


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of state["step"] (weights, optimizer, scheduler, RNG states, state),
    verify it, then drop the checkpoints older than the newest `keep`. Returns its folder.
    Raises CheckpointError when it cannot be written (the previous ones are then untouched)."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    step = int(state["step"])
    parent = checkpoint_dir(run_dir)
    final = parent / f"step-{step:06d}"
    partial = parent / f"{final.name}.partial"
    files.claim(run_dir, "checkpoint", f"checkpoint/{final.name}", f"checkpoint/{partial.name}")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **state}
    try:
        parent.mkdir(exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # a save cut short earlier: lcsm's own temporary folder
        partial.mkdir()
        listed = {}
        for name, write in ((WEIGHTS, lambda p: save_model(model, p, metadata={"step": str(step)})),
                            (TRAINER, lambda p: torch.save(trainer, p))):
            path = partial / name
            write(str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            listed[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        write_text(partial / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": listed}, indent=1) + "\n")
        if final.exists():  # the same step saved again (after a fallback): keep the earlier one aside
            os.replace(final, _aside(final, "replaced"))
        os.replace(partial, final)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)  # lcsm's own temporary folder
        raise CheckpointError(
            f"{final}: cannot write the checkpoint ({e.strerror or e}); the earlier checkpoints are kept as they were"
        ) from None
    problem = verify(Checkpoint(final, step))
    if problem:
        raise CheckpointError(f"{problem}: the checkpoint just written does not verify; the earlier ones are kept")
    _prune(run_dir, keep)
    return final


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
    """For --overwrite: remove a checkpoint folder lcsm wrote (step-N, step-N.partial, ...) as
    remove_checkpoint_folder does. Returns False when target is not one (nothing done)."""
    if target.parent.name != "checkpoint" or not target.name.startswith("step-") or not target.is_dir():
        return False
    remove_checkpoint_folder(target)
    return True


def _aside(folder: Path, why: str) -> Path:
    target = folder.with_name(f"{folder.name}.{why}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.{why}-{n}")
    return target


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
                    kept = _aside(bad.folder, "unreadable")
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


def find_weights(path: Path, log: Callable[[str], None] | None = None) -> tuple[Path, int]:
    """(weights file, step) for `lcsm eval` / `lcsm generate`: a run directory or its checkpoint/
    folder (the newest checkpoint that verifies), a step folder, or a model.safetensors file.
    Raises CheckpointError naming what is wrong."""
    path = Path(path)
    if path.is_file():
        step = _weights_step(path)
        if step is None:
            raise CheckpointError(f"{path}: not a readable safetensors file")
        return path, step
    if _STEP.match(path.name) and (path / WEIGHTS).exists():
        ckpt = Checkpoint(path, int(_STEP.match(path.name).group(1)))
        problem = verify(ckpt)
        if problem:
            raise CheckpointError(problem)
        return ckpt.weights, ckpt.step
    run_dir = path.parent if path.name == "checkpoint" and not (path / "checkpoint").exists() else path
    found = list_checkpoints(run_dir)
    if not found and (path / WEIGHTS).exists():  # a folder holding a bare model.safetensors
        return find_weights(path / WEIGHTS)
    problems = []
    for ckpt in found:
        # the flat layout has no manifest, and evaluation needs only the weights
        problem = verify(ckpt) if not ckpt.legacy else (None if ckpt.weights.exists() else f"{ckpt.weights}: missing")
        step = _weights_step(ckpt.weights) if problem is None else None
        if problem is None and step is None:
            problem = f"{ckpt.weights}: cannot be read (not a safetensors file, or cut short)"
        if problem is None:
            for _, why in problems:
                if log is not None:
                    log(f"{why}; using the previous checkpoint, step {step}")
            return ckpt.weights, step
        problems.append((ckpt, problem))
    if problems:
        raise CheckpointError("; ".join(why for _, why in problems) + ": no readable checkpoint")
    raise CheckpointError(f"{path}: no checkpoint here (looked for checkpoint/step-*/{WEIGHTS} and checkpoint/{WEIGHTS})")
