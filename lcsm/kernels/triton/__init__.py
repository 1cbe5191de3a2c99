"""Triton backends of the recurrence: chunked and scan kernels, their autograd functions, the decoding step."""
