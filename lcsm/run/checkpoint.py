"""Checkpoint IO: the one reader and writer of RUN/checkpoint/ (weights as safetensors, the
trainer's state as a torch file of plain tensors and containers, loaded with weights_only=True)."""

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
