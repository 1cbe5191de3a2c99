"""PyTorch backends of the recurrence: chunked (separable decays), scan (any decay), step (decoding)."""
