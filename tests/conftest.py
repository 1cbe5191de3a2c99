import dataclasses
import os

import torch

# Kernels are tested on the CPU under the Triton interpreter; it must be chosen before any
# @triton.jit function is defined, so before lcsm's Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpret_without_overflow_checks() -> None:
    """The interpreter checks every int32 add, sub and mul of a kernel for overflow (two casts to
    int64, two comparisons and an assert per operation, in Python): about 40% of the kernel tests'
    time. The tests' tensors are tiny (every offset far below 2**31), so those checks cannot fire; on the
    GPU they are compiled out unless a kernel is built with debug=True. The kernels' results are
    compared with the fp64 reference as before."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton (not Linux): nothing runs under the interpreter
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_without_overflow_checks()
