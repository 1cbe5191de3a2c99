"""Checkpoint IO: the one reader and writer of RUN/checkpoint/ (weights as safetensors, the
trainer's state as a torch file of plain tensors and containers, loaded with weights_only=True).

An *init checkpoint* is RUN/checkpoint/model.safetensors whose metadata has an "init" entry
(what made it, e.g. "upcycle") and step "0", with no trainer.pt beside it: weights to start a run
from with a fresh optimizer (`lcsm upcycle` writes one; `lcsm train --init-from` or `--resume
auto` starts from it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from lcsm.config.base import RecipeError


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    """model.safetensors, then trainer.pt; both carry the step so a mismatched pair is detected."""
    from safetensors.torch import save_model

    folder = run_dir / "checkpoint"
    folder.mkdir(exist_ok=True)
    step = state["step"]
    atomic_write(folder / "model.safetensors", lambda tmp: save_model(model, tmp, metadata={"step": str(step)}))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **state}
    atomic_write(folder / "trainer.pt", lambda tmp: torch.save(trainer, tmp))


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_model

    folder = run_dir / "checkpoint"
    weights = folder / "model.safetensors"
    try:
        trainer = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
        with safe_open(str(weights), "pt") as f:
            model_step = int((f.metadata() or {}).get("step", -1))
        load_model(model, str(weights), device=str(device))
    except Exception as e:
        raise RecipeError(f"{folder}: cannot read the checkpoint ({str(e).splitlines()[0]}); pass --overwrite to start over") from None
    if model_step != trainer["step"]:
        raise RecipeError(
            f"{folder}: model.safetensors (step {model_step}) and trainer.pt (step {trainer['step']}) do not match; "
            "the run was stopped while saving; pass --overwrite to start over"
        )
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return trainer




def checkpoint_step(run_dir: Path) -> int | None:
    """The step of RUN/checkpoint/trainer.pt, or None when there is none (or it cannot be read);
    a sharded run's checkpoint (lcsm/run/dcp.py) counts too, when it is the newer."""
    from lcsm.run.dcp import sharded_step

    sharded = sharded_step(run_dir)
    path = run_dir / "checkpoint" / "trainer.pt"
    if not path.exists():
        return sharded
    try:
        step = int(torch.load(path, weights_only=True, map_location="cpu")["step"])
    except Exception:
        return sharded
    return step if sharded is None else max(step, sharded)


def find_weights(path: str | Path) -> Path:
    """The model.safetensors of a run directory (RUN/checkpoint/), of a checkpoint/ folder, or the
    file itself. Raises RecipeError when there is none."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such run directory or checkpoint")
    if path.is_file():
        return path
    for weights in (path / "checkpoint" / "model.safetensors", path / "model.safetensors"):
        if weights.exists():
            return weights
    raise RecipeError(f"{path}: no checkpoint here (looked for checkpoint/model.safetensors)")


def weights_run_dir(weights: Path) -> Path | None:
    """The run directory a model.safetensors belongs to (the folder with config.yaml beside it or above)."""
    return next((p for p in (weights.parent, weights.parent.parent) if (p / "config.yaml").exists()), None)


def weights_metadata(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return dict(f.metadata() or {})


def save_init_weights(run_dir: Path, model, made_by: str, extra: dict | None = None) -> Path:
    """Write RUN/checkpoint/model.safetensors as an init checkpoint (step 0, metadata init = made_by)."""
    from safetensors.torch import save_model

    folder = run_dir / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"step": "0", "init": made_by, **{k: str(v) for k, v in (extra or {}).items()}}
    path = folder / "model.safetensors"
    atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata))
    return path


def init_weights(run_dir: Path) -> Path | None:
    """RUN's init checkpoint (see the module docstring), or None when it has none."""
    weights = run_dir / "checkpoint" / "model.safetensors"
    if not weights.exists() or (run_dir / "checkpoint" / "trainer.pt").exists():
        return None
    try:
        return weights if "init" in weights_metadata(weights) else None
    except Exception:
        return None


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
