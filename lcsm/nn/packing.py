"""Packed documents: several documents in one row, and no layer looks across a boundary.

`Model.forward(tokens, cu_seqlens=...)` builds one `Packing` per call and hands it to every block;
the block makes it the current packing while its token mixer runs (`current()`), the way the
sequence-parallel context is found (`lcsm.parallel.current()`), so that each stage which mixes
along time reads it where it needs it and no stage signature grows an argument:

    the recurrence          the varlen kernel (cu_seqlens): the state starts from zero per document
    short convolutions      a tap never reaches into the previous document (lcsm/nn/stages/common.py)
    positions               restart at 0 per document (rotations, RoPE)
    cumsoftmax              its running normaliser restarts per document
    Mixture-of-Memories     dense: the varlen kernel; sparse: one segment per (memory, document)
    attention               a block-diagonal causal mask, per row

The model flattens the batch [B,T] into one packed sequence [1,B·T] (the kernels take cu_seqlens
with a batch of one), so every row boundary is also a document boundary; attention alone works per
row again (its cost is quadratic in the row, not in B·T).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """The documents of one forward call, over its B·T tokens flattened row by row.

    cu_seqlens [N+1] int32 (on the tokens' device): document boundaries, row boundaries included,
    no empty document; lengths: the N lengths (host ints); positions [B·T] long: each token's
    position in its document; doc [B·T] long: its document's index; rows (B, T): the batch's shape.
    """

    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    positions: torch.Tensor
    doc: torch.Tensor
    rows: tuple[int, int]

    @classmethod
    def of(cls, cu_seqlens, B: int, T: int, device) -> "Packing":
        """From document boundaries over the flattened tokens (a tensor or a list: 0, ..., B·T,
        non-decreasing); row boundaries are added where missing, empty documents dropped.
        Raises ValueError naming what is wrong."""
        cu = torch.as_tensor(cu_seqlens)
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise ValueError(f"cu_seqlens: a 1-d integer tensor of document boundaries [N+1] (got shape {tuple(cu.shape)}, {cu.dtype})")
        bounds = [int(b) for b in cu.tolist()]  # the one host sync of a packed forward
        total = B * T
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"cu_seqlens: must start at 0 and end at B·T = {B}·{T} = {total} (got {bounds[0]} ... {bounds[-1]})")
        if any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens: the boundaries must be non-decreasing")
        # a document never continues into the next row: the rows are separate sequences
        bounds = sorted(set(bounds) | set(range(0, total + 1, T)))
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        lens = torch.tensor(lengths, device=device)
        starts = torch.tensor(bounds[:-1], device=device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        positions = torch.arange(total, device=device) - starts[doc]
        return cls(torch.tensor(bounds, dtype=torch.int32, device=device), lengths, positions, doc, (B, T))

    @property
    def n(self) -> int:
        """The number of documents."""
        return len(self.lengths)

    def split(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, ...]:
        """x with the B·T packed tokens along `dim` -> one view per document."""
        return torch.split(x, list(self.lengths), dim=dim)


def cu_seqlens_of(starts: torch.Tensor) -> torch.Tensor:
    """starts [B,T] bool (True where a document starts) -> cu_seqlens [N+1] int32 over the flattened
    rows, what Model.forward takes (row starts included)."""
    B, T = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    inner = starts.reshape(-1).nonzero()[:, 0].to(torch.int32)
    return torch.cat([inner, torch.tensor([B * T], dtype=torch.int32, device=starts.device)])


_CURRENT: Packing | None = None


def current() -> Packing | None:
    """The packing of the mixer running now, or None (every row is one sequence)."""
    return _CURRENT


@contextmanager
def using(packing: Packing | None):
    """Make `packing` current for the duration (a block wraps its token mixer in it)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, packing
    try:
        yield packing
    finally:
        _CURRENT = previous


__all__ = ["Packing", "cu_seqlens_of", "current", "using"]
