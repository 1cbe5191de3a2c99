"""What a layer's modules are built from besides their own spec: the model's sizes, the layer's
place in the stack, and the parameters that several layers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


class Shared:
    """A model-level parameter that several layers read (HGRN2's layer-wise lower bounds). The
    Model registers it under `name` and becomes its owner; layers read it through `get()`, so a
    wrapper that replaces the Model's parameters (FSDP, DDP) is seen by every layer."""

    def __init__(self, name: str, make: Callable[[], nn.Parameter]):
        self.name, self.make, self.owner = name, make, None

    def get(self) -> nn.Parameter:
        if self.owner is None:
            raise RuntimeError(f"the shared parameter '{self.name}' has no owner yet (the Model registers it)")
        return getattr(self.owner, self.name)


@dataclass
class LayerContext:
    """d_model, n_heads, norm_eps of the model; layer_idx of n_layers; `shared`: the model-level
    parameters the layers share, by name."""

    d_model: int
    n_heads: int
    layer_idx: int
    n_layers: int
    norm_eps: float = 1e-5
    shared: dict[str, Shared] = field(default_factory=dict)

    def shared_parameter(self, name: str, make: Callable[[], nn.Parameter]) -> Shared:
        """The model-level parameter `name` (made once, by the Model, from the first maker asked)."""
        if name not in self.shared:
            self.shared[name] = Shared(name, make)
        return self.shared[name]

    def at(self, layer_idx: int) -> "LayerContext":
        """The same model and shared parameters, another layer."""
        return LayerContext(self.d_model, self.n_heads, layer_idx, self.n_layers, self.norm_eps, self.shared)
