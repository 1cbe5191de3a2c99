"""The recurrent-state cache of a model: one dict per layer, owned by the caller.

Protocol (every token mixer): `mixer(x, cache=d)` starts from the state it finds in `d` (an empty
dict is the empty context) and writes its new state back into `d`.
Stages keep their own state in a sub-dict named after the stage ("input", "expand", "shrink",
"oscillation"). What each mixer holds is listed in docs/generation.md.

New values are written into the tensors already in the cache where the shapes agree, so that the
tensors of a cache keep their storage from one token to the next: a captured CUDA graph of the
decoding step (lcsm/generate.py) replays on the very same buffers.
"""

from __future__ import annotations

import torch


def new_cache(model, max_len: int | None = None) -> list[dict]:
    """An empty cache for `model` (one dict per layer). max_len: a hint that lets layers whose
    state grows with the context (attention's KV cache) allocate it once."""
    return [({"max_len": int(max_len)} if max_len else {}) for _ in model.blocks]


def store(cache: dict, key: str, value: torch.Tensor) -> torch.Tensor:
    """cache[key] = value, in place when a tensor of the same shape and dtype is already there."""
    old = cache.get(key)
    if torch.is_grad_enabled() and (value.requires_grad or getattr(old, "requires_grad", False)):
        # differentiating through the cache (training from a given state): keep the graph, no copy
        cache[key] = value
        return value
    if isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
        # (under torch.compile the value is always a new tensor, and data pointers are not traceable)
        if torch.compiler.is_compiling() or old.data_ptr() != value.data_ptr():
            old.copy_(value)
        return old
    cache[key] = value
    return value


def sub(cache: dict | None, name: str) -> dict | None:
    """The sub-dict of one stage (None when there is no cache)."""
    return None if cache is None else cache.setdefault(name, {})


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of a cache (a list of dicts, a dict, or nested dicts)."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, dict):
        return sum(cache_bytes(v) for v in cache.values())
    if isinstance(cache, (list, tuple)):
        return sum(cache_bytes(v) for v in cache)
    return 0
