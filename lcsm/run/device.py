"""Device and precision: where a run computes and in which dtype."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lcsm.config.base import RecipeError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; a device that is not here is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"device: '{name}' asked for, but CUDA is not available on this machine; use device: cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise RecipeError(f"device: '{name}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RecipeError("device: 'mps' asked for, but MPS is not available on this machine; use device: cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for; fp32 means no autocast."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
