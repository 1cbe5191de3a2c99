"""The generic EOS recurrence: one entry point, several backends.

Model code calls `recurrence` / `step` with the canonical tensors and a `Decay`; the public
functions `eos_recurrence` / `eos_step` take the decays as keywords (the delta rule's removal key
`w` among them); `delta_transition` gives a slice's K×K transition product for LASP-2. No kernel
reads a spec.
"""

from .api import BACKENDS, delta_transition, eos_recurrence, eos_step, recurrence, state_segments, step
from .decay import LOG_ZERO, Decay
from .reference import eos_reference

__all__ = ["BACKENDS", "Decay", "LOG_ZERO", "delta_transition", "eos_recurrence", "eos_reference", "eos_step", "recurrence", "state_segments", "step"]
