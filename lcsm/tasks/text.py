"""Language modelling on text: a corpus, a tokenizer, training windows and a held-out tail.

The default corpus is the English documentation embedded in every CPython (`pydoc_data.topics`,
about 0.5 MB), so a text run works offline with nothing to download. The tokenizer is bytes
(UTF-8, 256 tokens) or a byte-level BPE trained on the training split with the `tokenizers`
package (an optional extra) and saved in the run directory, so resuming and `lcsm eval` use the
very same one. The last val_fraction of the corpus is the validation split; windows of
seq_len + 1 tokens do not overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import torch
from pydantic import Field

from lcsm.config.base import Base

from lcsm.tasks.base import TaskSpec, Segment, TaskData, TaskError

MIN_WINDOWS = 1


# --------------------------------------------------------------------------- config


class ByteTokenizerSpec(Base):
    """UTF-8 bytes: 256 tokens, nothing to train."""

    kind: Literal["byte"]


class BPETokenizerSpec(Base):
    """Byte-level BPE trained on the training split with the `tokenizers` package; saved in the run."""

    kind: Literal["bpe"]
    vocab_size: int = Field(4096, ge=257, le=1 << 20)
    min_frequency: int = Field(2, ge=1)


Tokenizer = Annotated[Union[ByteTokenizerSpec, BPETokenizerSpec], Field(discriminator="kind")]


class TextTask(TaskSpec):
    """Language modelling on text: next-token loss at every position."""

    kind: Literal["text"]
    corpus: str = Field("pydoc", description="'pydoc' (CPython's embedded docs, offline) or a text file or folder")
    tokenizer: Tokenizer = Field(default_factory=lambda: ByteTokenizerSpec(kind="byte"))
    seq_len: int = Field(256, ge=2, description="tokens per training window")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="the tail of the corpus held out for validation")

    @property
    def model_vocab_size(self) -> int:
        return 256 if self.tokenizer.kind == "byte" else self.tokenizer.vocab_size

    def load_tokenizer(self, run_dir: Path):
        """Bytes, or the BPE tokenizer saved in the run directory (tokenizer.json)."""
        if self.tokenizer.kind == "byte":
            return ByteTokenizer()
        path = Path(run_dir) / "tokenizer.json"
        if not path.exists():
            raise TaskError(f"{run_dir}: a BPE text run without its tokenizer.json")
        return BPETokenizer.load(path)


# --------------------------------------------------------------------------- data


def read_corpus(corpus: str) -> str:
    """The corpus text: 'pydoc', a UTF-8 text file, or a folder (its text files, sorted, joined)."""
    if corpus == "pydoc":
        from pydoc_data import topics

        return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
    path = Path(corpus)
    if not path.exists():
        raise TaskError(f"corpus: {corpus}: no such file or folder")
    if path.is_file():
        try:
            return path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise TaskError(f"corpus: {corpus}: cannot read ({e.strerror})") from None
    texts = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)):
        try:
            texts.append(file.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # binaries and unreadable files are not text
    if not texts:
        raise TaskError(f"corpus: {corpus}: the folder holds no readable UTF-8 text files")
    return "\n\n".join(texts)


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        # straight from the bytes: a list of Python ints costs seconds and gigabytes for a corpus of
        # tens of MB, in every worker of an ablation
        data = bytearray(text.encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def bytes_per_token(self) -> torch.Tensor:
        return torch.ones(256)


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` package."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError:
            raise TaskError("tokenizer: bpe needs the 'tokenizers' package: pip install 'lcsm[bpe]' (or use tokenizer: {kind: byte})") from None
        return tokenizers

    @classmethod
    def train(cls, text: str, vocab_size: int, min_frequency: int) -> "BPETokenizer":
        t = cls._lib()
        tok = t.Tokenizer(t.models.BPE())
        tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = t.decoders.ByteLevel()
        trainer = t.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        return cls(cls._lib().Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        self.tok.save(str(tmp))
        tmp.replace(path)

    def encode(self, text: str) -> list[int]:
        return [i for chunk in _chunks(text) for i in self.tok.encode(chunk).ids]

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def bytes_per_token(self) -> torch.Tensor:
        # byte-level tokens spell each byte as one character, so a token's length is its bytes
        out = torch.zeros(self.vocab_size)
        for token, i in self.tok.get_vocab().items():
            out[i] = len(token)
        return out


def _chunks(text: str, size: int = 1 << 16):
    """Split on line ends near every `size` characters: the same pieces for training and encoding."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def make_tokenizer(task, train_text: str, run_dir: Path | None, log=lambda s: None):
    if task.tokenizer.kind == "byte":
        return ByteTokenizer()
    path = run_dir / "tokenizer.json" if run_dir is not None else None
    if path is not None and path.exists():
        return BPETokenizer.load(path)
    log(f"training a BPE tokenizer ({task.tokenizer.vocab_size} tokens) on {len(train_text):,} characters")
    tok = BPETokenizer.train(train_text, task.tokenizer.vocab_size, task.tokenizer.min_frequency)
    if path is not None:
        tok.save(path)
    return tok


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream [n] -> inputs, labels [N, seq_len]: non-overlapping windows, labels shifted by one."""
    N = (ids.numel() - 1) // seq_len
    inputs = ids[: N * seq_len].view(N, seq_len)
    labels = ids[1 : N * seq_len + 1].view(N, seq_len)
    return inputs.clone(), labels.clone()


def build(task, seed: int, run_dir: Path | None = None, log=lambda s: None, train: bool = True) -> TaskData:
    text = read_corpus(task.corpus)
    cut = int(len(text) * (1 - task.val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    tok = make_tokenizer(task, train_text, run_dir, log)
    train_ids, val_ids = tok.encode_tensor(train_text), tok.encode_tensor(val_text)
    need = task.seq_len + 1
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if ids.numel() < need:
            raise TaskError(
                f"corpus: {task.corpus}: the {split} split has {ids.numel():,} tokens, less than one context of "
                f"seq_len + 1 = {need}; use a larger corpus, a smaller task.seq_len or a larger task.val_fraction"
            )
    train = [Segment(*windows(train_ids, task.seq_len), {"seq_len": task.seq_len})]
    test = [Segment(*windows(val_ids, task.seq_len), {"seq_len": task.seq_len})]
    vocab = task.model_vocab_size
    bpt = torch.zeros(vocab)
    b = tok.bytes_per_token()
    bpt[: b.numel()] = b[:vocab]
    return TaskData("text", vocab, train, test, bytes_per_token=bpt, tokenizer=tok)
