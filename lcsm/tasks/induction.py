"""Induction heads, as in the Mamba paper (safari's `generate_induction_head`).

seq_len random tokens from the vocabulary less two specials, with a trigger token (`=>`, id
vocab-2) written at 1..num_triggers random places, each followed by the same induction_len
tokens (those that followed the first trigger); then a final trigger and those tokens again. The
model sees seq_len + induction_len tokens and must emit the copied tokens after the final trigger:
the test labels are only there. Training labels are every next token (safari) or, with
loss: answer, the answer only. Id vocab-1 (safari's no-op `.`) is reserved and unused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from typing import Literal

from pydantic import Field, model_validator

from lcsm.config.base import FieldError

from lcsm.tasks.base import TaskSpec, IGNORE, LengthSetting, Segment, TaskData, cached, derive_seed

VERSION = 1


# --------------------------------------------------------------------------- config


class InductionTask(TaskSpec):
    """Induction heads (safari's generate_induction_head, as in the Mamba paper): random tokens with a
    trigger token inserted; after the final trigger the model must emit the token that followed the
    first one."""

    kind: Literal["induction"]
    vocab_size: int = Field(16, ge=4, description="including the two special tokens (trigger, no-op)")
    induction_len: int = Field(1, ge=1, description="tokens to copy after the trigger")
    num_triggers: int = Field(1, ge=1, description="triggers in the sequence (half the examples have one)")
    loss: Literal["all", "answer"] = Field("all", description="train on every next token (safari) or the answer only")
    train: list[LengthSetting] = Field(
        default_factory=lambda: [LengthSetting(seq_len=256, num_examples=20_000)], min_length=1
    )
    test: list[LengthSetting] = Field(
        default_factory=lambda: [LengthSetting(seq_len=n, num_examples=500) for n in (64, 256, 1024)], min_length=1
    )
    cache: bool = True

    @model_validator(mode="after")
    def _lengths(self):
        for split in ("train", "test"):
            for n, s in enumerate(getattr(self, split)):
                if s.seq_len < self.induction_len + 3:
                    raise FieldError((split, n, "seq_len"), f"must be at least induction_len + 3 = {self.induction_len + 3}")
        return self

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------- data


def induction_heads(vocab_size: int, num_examples: int, seq_len: int, seed: int, induction_len: int = 1, num_triggers: int = 1):
    """Full sequences [num_examples, seq_len + 1 + induction_len] int64 (before the next-token shift)."""
    gen = torch.Generator().manual_seed(seed)
    N, n = num_examples, induction_len
    trigger = vocab_size - 2
    seq = torch.randint(0, vocab_size - 2, (N, seq_len), generator=gen)
    # half of the examples have a single trigger (safari draws this per example)
    count = torch.where(torch.rand(N, generator=gen) < 0.5, 1, num_triggers)
    pos = torch.randint(0, seq_len - (1 + n), (N, num_triggers), generator=gen)
    pos = torch.where(torch.arange(num_triggers) < count[:, None], pos, seq_len)  # unused draws sort last
    pos = pos.sort(dim=1).values
    rows = torch.arange(N)
    to_copy = torch.stack([seq[rows, pos[:, 0] + 1 + i] for i in range(n)], dim=1)  # [N, n]
    # keep a trigger only if it does not overlap the copied tokens of the previous kept one
    last = pos[:, 0]
    for j in range(num_triggers):
        keep = (pos[:, j] < seq_len) & ((j == 0) | (pos[:, j] - last > n))
        r = rows[keep]
        seq[r, pos[keep, j]] = trigger
        for i in range(n):
            seq[r, pos[keep, j] + 1 + i] = to_copy[keep, i]
        last = torch.where(keep, pos[:, j], last)
    end = torch.full((N, 1), trigger, dtype=torch.long)
    return torch.cat([seq, end, to_copy], dim=1)


def _segment(task, setting, seed: int, split: str, index: int) -> Segment:
    config = {
        "generator": "induction",
        "version": VERSION,
        "vocab_size": task.vocab_size,
        "num_examples": setting.num_examples,
        "seq_len": setting.seq_len,
        "induction_len": task.induction_len,
        "num_triggers": task.num_triggers,
        "seed": derive_seed(seed, "induction", split, index),
    }
    args = {k: v for k, v in config.items() if k not in ("generator", "version")}
    data = cached("induction", config, lambda: {"sequences": induction_heads(**args)}, task.cache)
    full = data["sequences"]
    inputs, labels = full[:, :-1].contiguous(), full[:, 1:].clone()
    if split == "test" or task.loss == "answer":
        labels[:, : -task.induction_len] = IGNORE
    return Segment(inputs, labels, {"seq_len": setting.seq_len})


def build(task, seed: int, run_dir: Path | None = None, log=lambda s: None, train: bool = True) -> TaskData:
    train = [_segment(task, s, seed, "train", n) for n, s in enumerate(task.train)] if train else []
    test = [_segment(task, s, seed, "test", n) for n, s in enumerate(task.test)]
    return TaskData("induction", task.vocab_size, train, test)
