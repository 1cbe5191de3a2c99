"""Selective copying, as in the Mamba paper (S4's `torch_copying_data` generator).

An example of length seq_len = L + 2M: M data tokens from [1, vocab-1) scattered in order among
L + M noise tokens (0), then M marker tokens (vocab-1). At the j-th marker the model must emit the
j-th data token; those are the only labelled positions. With variable=False the data tokens are a
prefix (plain copying, solvable without selectivity).
"""

from __future__ import annotations

from pathlib import Path

import torch
from typing import Literal

from pydantic import Field, model_validator

from lcsm.config.base import FieldError

from lcsm.tasks.base import TaskSpec, IGNORE, LengthSetting, Segment, TaskData, cached, derive_seed, sample_without_replacement

VERSION = 1


# --------------------------------------------------------------------------- config


class CopyingTask(TaskSpec):
    """Selective copying (S4's torch_copying_data, as in the Mamba paper): M tokens scattered among
    noise, then M markers; the model must emit the tokens in order at the markers."""

    kind: Literal["selective_copying"]
    vocab_size: int = Field(16, ge=4, description="0 is noise, 1..vocab-2 data tokens, vocab-1 the marker")
    num_tokens: int = Field(16, ge=1, description="M, the tokens to memorise")
    variable: bool = Field(True, description="scatter the tokens at random positions (selective); else a prefix")
    train: list[LengthSetting] = Field(
        default_factory=lambda: [LengthSetting(seq_len=256, num_examples=20_000)], min_length=1
    )
    test: list[LengthSetting] = Field(default_factory=lambda: [LengthSetting(seq_len=256, num_examples=1_000)], min_length=1)
    cache: bool = True

    @model_validator(mode="after")
    def _lengths(self):
        for split in ("train", "test"):
            for n, s in enumerate(getattr(self, split)):
                if s.seq_len < 2 * self.num_tokens:
                    raise FieldError((split, n, "seq_len"), f"must be at least 2·num_tokens = {2 * self.num_tokens} (tokens and markers)")
        return self

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------- data


def selective_copying(vocab_size: int, num_examples: int, seq_len: int, num_tokens: int, seed: int, variable: bool = True):
    """inputs, labels: [num_examples, seq_len] int64; labels hold the data tokens at the markers."""
    gen = torch.Generator().manual_seed(seed)
    N, M = num_examples, num_tokens
    slots = seq_len - M  # L + M positions for noise and data
    tokens = torch.randint(1, vocab_size - 1, (N, M), generator=gen)
    if variable:
        positions = sample_without_replacement(N, slots, M, gen).sort(dim=1).values
    else:
        positions = torch.arange(M).expand(N, M)
    body = torch.zeros(N, slots, dtype=torch.long).scatter_(1, positions, tokens)
    markers = torch.full((N, M), vocab_size - 1, dtype=torch.long)
    inputs = torch.cat([body, markers], dim=1)
    labels = torch.cat([torch.full((N, slots), IGNORE, dtype=torch.long), tokens], dim=1)
    return inputs, labels


def _segment(task, setting, seed: int, split: str, index: int) -> Segment:
    config = {
        "generator": "selective_copying",
        "version": VERSION,
        "vocab_size": task.vocab_size,
        "num_examples": setting.num_examples,
        "seq_len": setting.seq_len,
        "num_tokens": task.num_tokens,
        "variable": task.variable,
        "seed": derive_seed(seed, "selective_copying", split, index),
    }
    args = {k: v for k, v in config.items() if k not in ("generator", "version")}
    data = cached("copying", config, lambda: dict(zip(("inputs", "labels"), selective_copying(**args))), task.cache)
    return Segment(data["inputs"], data["labels"], {"seq_len": setting.seq_len})


def build(task, seed: int, run_dir: Path | None = None, log=lambda s: None, train: bool = True) -> TaskData:
    train = [_segment(task, s, seed, "train", n) for n, s in enumerate(task.train)] if train else []
    test = [_segment(task, s, seed, "test", n) for n, s in enumerate(task.test)]
    return TaskData("selective_copying", task.vocab_size, train, test)
