"""The generic EOS recurrence (imported as `lcsm.kernels`): one entry point, several backends.

Model code calls `eos_recurrence` with canonical tensors; no kernel reads a spec.
"""

from .api import BACKENDS, eos_recurrence, eos_step
from .reference import eos_reference

__all__ = ["BACKENDS", "eos_recurrence", "eos_reference", "eos_step"]
