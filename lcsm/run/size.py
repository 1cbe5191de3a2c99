"""Sizes before allocation: the parameters of a spec, the memory a recipe needs, against sane limits.

A spec with d_model: 10**9 is valid YAML; building it would overflow torch's size arithmetic or
exhaust the allocator (or, with many layers, build modules for minutes). The model is counted on
the meta device (shapes only, nothing allocated), extrapolated from one period of layers when
there are very many, and refused with the estimate in the message when it is beyond reason
(MAX_PARAMETERS) or beyond the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lcsm.config.base import RecipeError, SpecError
from lcsm.config.spec import ModelSpec
from lcsm.nn.model import Model

MAX_PARAMETERS = 10**12  # 4 TB of fp32 weights: no spec beyond it is a model anyone can train
MAX_LAYERS_BUILT = 1024  # deeper models are counted from one period of their layers
TRAIN_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and AdamW's two moments
BYTES_PER_TOKEN = 16  # a synthetic example's inputs and labels, int64 each


class SizeError(SpecError):
    """A spec or recipe is too large to build or to train here; str() gives the estimate."""


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass
class ParameterCount:
    parameters: int
    exact: bool  # False: extrapolated from one period of layers

    def __str__(self) -> str:
        return ("" if self.exact else "about ") + _si(self.parameters)


def _dims(spec: ModelSpec) -> str:
    return f"d_model = {spec.d_model}, n_layers = {spec.n_layers}, vocab_size = {spec.vocab_size}"


def _rough(spec: ModelSpec) -> int:
    """A transformer-like count (12·L·d² + the embeddings), for when the model cannot even be counted."""
    return 12 * spec.n_layers * spec.d_model**2 + spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)


def count_parameters(spec: ModelSpec, limit: int = MAX_PARAMETERS) -> ParameterCount:
    """The parameters of a spec, counted without allocating. Raises SizeError (with the estimate)
    beyond `limit` or when torch cannot represent the model's tensors at all."""
    embed = spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)
    if embed > limit:  # the embedding alone: plain arithmetic, before torch sees a size
        raise SizeError(f"model: at least {_si(embed)} parameters in the embeddings alone, beyond lcsm's limit of "
                        f"{_si(limit)} ({_bytes(4 * limit)} of fp32 weights); {_dims(spec)}")
    period = len(spec.pattern) if spec.pattern else 1
    try:
        with torch.device("meta"):
            if spec.n_layers <= MAX_LAYERS_BUILT:
                count = ParameterCount(Model(spec).num_parameters(), True)
            else:
                small = Model(spec.model_copy(update={"n_layers": period}))
                per = sum(p.numel() for p in small.blocks.parameters())
                count = ParameterCount(small.num_parameters() - per + per * (spec.n_layers // period), False)
    except (RuntimeError, OverflowError, ValueError, MemoryError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SizeError(f"model: too large to build (about {_si(_rough(spec))} parameters; torch: {reason}); {_dims(spec)}") from None
    if count.parameters > limit:
        raise SizeError(f"model: {count} parameters, beyond lcsm's limit of {_si(limit)} ({_bytes(4 * limit)} of fp32 "
                        f"weights); {_dims(spec)}")
    return count


def data_tokens(task) -> int:
    """Tokens of the synthetic examples a task generates (its train and test settings); 0 for tasks
    whose size is their corpus (text)."""
    total = 0
    for split in ("train", "test"):
        for setting in getattr(task, split, None) or []:
            total += getattr(setting, "num_examples", 0) * getattr(setting, "seq_len", 0)
    return total


def memory_of(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what) of the memory a run on `device` allocates from: the GPU's, or this machine's RAM."""
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            return int(props.total_memory), f"{props.name}'s memory"
        except Exception:
            return None, "GPU memory"
    return ram(), "this machine's memory"


def ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_recipe_size(recipe, device: torch.device) -> ParameterCount:
    """Refuse a recipe whose model or data cannot fit before anything is allocated: the model beyond
    MAX_PARAMETERS; its weights, gradients and AdamW state (16 bytes a parameter) beyond the
    device's memory; the synthetic data beyond this machine's memory. Raises RecipeError with the
    estimate; returns the parameter count."""
    try:
        count = count_parameters(recipe.model)
    except SizeError as e:
        raise RecipeError(str(e)) from None
    need = TRAIN_BYTES_PER_PARAMETER * count.parameters
    have, where = memory_of(device)
    if have is not None and need > have:
        raise RecipeError(
            f"model: {count} parameters need {_bytes(need)} to train (fp32 weights, gradients and AdamW state, before "
            f"activations), more than the {_bytes(have)} of {where}; {_dims(recipe.model)}"
        )
    tokens = data_tokens(recipe.task)
    data = BYTES_PER_TOKEN * tokens
    memory = ram()
    if memory is not None and data > memory:
        raise RecipeError(
            f"task: {_si(tokens)} tokens of examples (num_examples × seq_len over the train and test settings) need "
            f"{_bytes(data)}, more than the {_bytes(memory)} of this machine's memory; use fewer or shorter examples"
        )
    return count
