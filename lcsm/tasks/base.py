"""What every task shares: data for training and evaluation, as blocks of (inputs, labels) token tensors.

Every task turns its recipe section into a `TaskData`: train and test `Segment`s. A segment holds
examples of one shape (one sequence length, one MQAR setting, ...); labels are -100 wherever no
loss is taken, so the trainer needs to know nothing about the task. The order in which training
batches are drawn is a pure function of (seed, step): that is what makes a resumed run exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from lcsm.config.base import Base

IGNORE = -100  # label of positions that carry no loss (as torch's cross_entropy ignore_index)


class TaskError(ValueError):
    """A task cannot be built from its settings or its data; str() is the message for the user."""


@dataclass
class Segment:
    """Examples of one shape.

    inputs, labels: [N, T] int64; labels[n, t] is the target of the output at position t
    (already shifted), or IGNORE. `slice` names the setting, e.g. {"seq_len": 64, "num_kv_pairs": 4};
    evaluation reports one row per slice. starts: [N, T] bool or None, True where a packed
    document starts (the model restarts there: Model.forward's cu_seqlens).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    slice: dict = field(default_factory=dict)
    starts: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.slice.items()) or "all"


@dataclass
class TaskData:
    """What a task gives the trainer and the evaluator.

    vocab_size: the model's vocabulary. bytes_per_token: [vocab_size] float, the number of text
    bytes each token stands for (text tasks only; used for bits per byte). tokenizer: an object
    with encode/decode for text tasks, else None. sampler: a task whose training data does not fit
    in memory (a corpus) streams it instead of listing `train` segments (see Batches).
    """

    kind: str
    vocab_size: int
    train: list[Segment]
    test: list[Segment]
    bytes_per_token: torch.Tensor | None = None
    tokenizer: object | None = None
    sampler: "Sampler | None" = None


@dataclass
class Batch:
    """One training batch: tokens, labels [B, T] int64; starts [B, T] bool where packed documents
    start (None: every row is one sequence)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor | None = None


class Sampler(ABC):
    """Training batches streamed from data too large to hold (lcsm/tasks/corpus.py): batch(...)
    must be a pure function of (batch_size, seed, step), so that a resumed run is exact."""

    @abstractmethod
    def steps_per_epoch(self, batch_size: int) -> int: ...

    @abstractmethod
    def batch(self, batch_size: int, seed: int, step: int) -> Batch: ...


class TaskSpec(Base):
    """Base of every task's recipe section (a pydantic class with a `kind`)."""

    def load_tokenizer(self, run_dir: Path):
        """The text tokenizer a run of this task uses, or None for tasks without text."""
        return None


class LengthSetting(Base):
    """A block of examples of one length."""

    seq_len: int = Field(ge=2)
    num_examples: int = Field(ge=1)


# --------------------------------------------------------------------------- seeds and caching


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one purpose ('train', 'test', setting index, ...).

    Hashing the purpose into the seed keeps train and test data disjoint streams, and adding a
    setting never changes the data of the others.
    """
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def cache_dir() -> Path:
    return Path(os.environ.get("LCSM_CACHE") or Path.home() / ".cache" / "lcsm")


def cached(name: str, config: dict, make: Callable[[], dict], enabled: bool = True) -> dict:
    """make() once per config: the tensors are stored as <cache>/<name>-<hash>.pt.

    The hash covers every argument of the generator (and its version, inside `config`), so a
    changed setting never reads stale data. A cache that cannot be written is only skipped.
    """
    if not enabled:
        return make()
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            pass  # a truncated or foreign file: make it again
    data = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return data


# --------------------------------------------------------------------------- sampling helpers


def sample_without_replacement(n_rows: int, n: int, k: int, gen: torch.Generator, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[n_rows, k] int64: for every row, k distinct integers from [0, n), in random order.

    With log_weights [n], each draw picks from the remaining integers with probability ∝ weight
    (numpy's choice(replace=False, p=...)); the Gumbel top-k trick gives exactly that law.
    """
    if k > n:
        raise TaskError(f"cannot draw {k} distinct items from {n}")
    out = []
    rows_per_chunk = max(1, (1 << 22) // max(n, 1))  # bound the [rows, n] fp64 scratch to 32 MB
    for start in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - start)
        u = torch.rand(rows, n, generator=gen, dtype=torch.float64).clamp_min_(1e-300)
        score = -torch.log(-torch.log(u)) if log_weights is not None else u
        if log_weights is not None:
            score = score + log_weights.to(torch.float64)
        out.append(score.topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


# --------------------------------------------------------------------------- batches


def epoch_batches(segments: list[Segment], batch_size: int, seed: int, epoch: int) -> list[tuple[int, torch.Tensor]]:
    """The training batches of one epoch: (segment index, example indices [b]) in order.

    Each segment is shuffled and cut into batches of one shape; the batch order is shuffled
    across segments. A pure function of (seed, epoch), so a resumed run draws the same batches.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    batches = []
    for s, seg in enumerate(segments):
        perm = torch.randperm(len(seg), generator=gen)
        batches += [(s, perm[i : i + batch_size]) for i in range(0, len(seg), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def steps_per_epoch(segments: list[Segment], batch_size: int) -> int:
    return sum(-(-len(seg) // batch_size) for seg in segments)


class Batches:
    """The training batches of a task as a pure function of (seed, step): the shuffled segments of
    each epoch (epoch_batches), or the task's sampler (streamed data). What the trainer draws from."""

    def __init__(self, data: TaskData, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        sampler = data.sampler
        self.steps_per_epoch = sampler.steps_per_epoch(batch_size) if sampler is not None else steps_per_epoch(data.train, batch_size)
        self._epoch, self._order = -1, None

    def at(self, step: int) -> Batch:
        """The batch of optimizer step `step` (0-based: the batch the step-th update trains on)."""
        if self.data.sampler is not None:
            return self.data.sampler.batch(self.batch_size, self.seed, step)
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one epoch's order at a time
            self._epoch, self._order = epoch, epoch_batches(self.data.train, self.batch_size, self.seed, epoch)
        seg_index, rows = self._order[index]
        seg = self.data.train[seg_index]
        return Batch(seg.inputs[rows], seg.labels[rows], None if seg.starts is None else seg.starts[rows])
