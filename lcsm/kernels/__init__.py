"""The generic EOS recurrence: one entry point, several backends.

Model code calls `recurrence` / `step` with the canonical tensors and a `Decay`; the public
functions `eos_recurrence` / `eos_step` take the decays as keywords. No kernel reads a spec.
"""

from .api import BACKENDS, eos_recurrence, eos_step, recurrence, step
from .decay import LOG_ZERO, Decay
from .reference import eos_reference

__all__ = ["BACKENDS", "Decay", "LOG_ZERO", "eos_recurrence", "eos_reference", "eos_step", "recurrence", "step"]
