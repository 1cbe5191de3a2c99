import os

import torch

# Kernels are tested on the CPU under the Triton interpreter; it must be chosen before any
# @triton.jit function is defined, so before lcsm's Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
