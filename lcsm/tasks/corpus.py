"""Language modelling on a prepared corpus: memory-mapped token shards, streamed, packed or in windows.

`lcsm data prepare` (lcsm/tasks/prepare.py) writes a corpus directory:

    DIR/manifest.json           format, tokenizer (kind, vocabulary, EOS id), the splits' shards
                                with their token and document counts and sha256, the sources
    DIR/train-00000.bin ...     tokens as uint16 (uint32 for vocabularies over 65536), memory-mapped
    DIR/train-00000.idx ...     int64 document offsets into the shard [documents + 1]
    DIR/val-00000.bin/.idx      the validation split
    DIR/tokenizer.json          the tokenizer as given (bpe, hf); none for bytes

Every document is preceded by the EOS token and every shard ends with one, so a shard is one
token stream `EOS d1 EOS d2 ... EOS`: the model learns where a document ends and starts the next
from the separator, as GPT-2's <|endoftext|>. A document's offset is that of its separator.

Training draws rows of seq_len + 1 tokens (inputs and labels shifted by one) as a pure function of
(seed, step) — nothing but the step has to be saved for an exact resume, and memory stays flat in
the corpus size (the shards are never read whole):

    packing: documents   the rows are the stream cut at multiples of seq_len, in an order that is a
                         keyed bijection of the row numbers (a Feistel network: no permutation array);
                         every document starting in a row restarts the model's state there
                         (Batch.starts -> Model.forward's cu_seqlens). A document longer than a row
                         goes on in the next row of the stream, from a zero state.
    packing: windows     windows at uniformly random offsets, the model reading across separators
                         (the classic GPT-2 recipe; no restarts).

The validation rows are the val split's rows at evenly spaced row numbers (eval_windows of them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lcsm.config.base import FieldError
from lcsm.tasks.base import Batch, Sampler, Segment, TaskData, TaskError, TaskSpec, derive_seed
from lcsm.tasks.text import BPETokenizer

FORMAT = "lcsm-corpus"
VERSION = 1
MANIFEST = "manifest.json"
# the copies a run keeps of its corpus's tokenizer (lcsm generate, lcsm export need no corpus)
RUN_MANIFEST = "corpus.json"
RUN_TOKENIZER = "tokenizer.json"


# --------------------------------------------------------------------------- tokenizers


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json, as `tokenizers` and `transformers`
    save it), used as is: its normaliser, pre-tokenizer and model; no special tokens added."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: Path) -> "HFTokenizer":
        tokenizers = BPETokenizer._lib()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust parser's error: a JSON or model error
            raise TaskError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def bytes_per_token(self) -> torch.Tensor:
        """UTF-8 bytes each token spells (0 for special tokens). Exact for byte-level models
        (each character of a token is one byte); otherwise the bytes of the token decoded alone."""
        out = torch.zeros(self.vocab_size)
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        byte_level = json.loads(self.tok.to_str()).get("decoder", {}) or {}
        byte_level = byte_level.get("type") == "ByteLevel"
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if token in special or i >= self.vocab_size:
                continue
            out[i] = len(token) if byte_level else len(self.tok.decode([i]).encode("utf-8"))
        return out


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def bytes_per_token(self) -> torch.Tensor:
        return torch.ones(256)


class CorpusTokenizer:
    """A corpus's tokenizer with its EOS: the base tokenizer's own EOS token, or one id appended
    after its vocabulary (bytes: 256). encode() never emits EOS; decode() drops it."""

    def __init__(self, base, eos_id: int, vocab_size: int, info: dict):
        self.base, self.eos_id, self.vocab_size, self.info = base, eos_id, vocab_size, info

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.base.decode([i for i in ids if i != self.eos_id and i < self.base.vocab_size])

    def bytes_per_token(self) -> torch.Tensor:
        out = torch.zeros(self.vocab_size)
        b = self.base.bytes_per_token()
        out[: b.numel()] = b[: self.vocab_size]
        out[self.eos_id] = 0.0  # the separator spells no text
        return out


def load_tokenizer_info(info: dict, folder: Path) -> CorpusTokenizer:
    """The tokenizer a manifest describes ({"kind", "file", "eos_id", "vocab_size", ...}), its file
    in `folder`."""
    kind = info.get("kind")
    if kind == "bytes":
        base = ByteTokenizer()
    elif kind in ("bpe", "hf"):
        path = folder / info.get("file", RUN_TOKENIZER)
        if not path.exists():
            raise TaskError(f"{path}: the tokenizer file of the corpus is missing")
        base = BPETokenizer.load(path) if kind == "bpe" else HFTokenizer.load(path)
    else:
        raise TaskError(f"{folder}: unknown tokenizer kind {kind!r} in the manifest")
    return CorpusTokenizer(base, int(info["eos_id"]), int(info["model_vocab_size"]), info)


# --------------------------------------------------------------------------- reading a corpus


@dataclass
class Shard:
    """One memory-mapped shard: tokens [n] (uint16/uint32) and document offsets [d+1] (int64)."""

    file: Path
    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]


class Split:
    """The shards of one split (train or val), as rows of seq_len + 1 tokens."""

    def __init__(self, name: str, shards: list[Shard], sources: list[dict]):
        self.name, self.shards, self.sources = name, shards, sources
        self.tokens = sum(len(s) for s in shards)
        self.documents = sum(s.offsets.shape[0] - 1 for s in shards)

    def rows(self, seq_len: int) -> np.ndarray:
        """Cumulative row counts per shard [shards + 1]: shard s has (n_s - 1) // seq_len rows
        (windows of seq_len + 1 at multiples of seq_len; the last < seq_len tokens are left out)."""
        return np.concatenate([[0], np.cumsum([max(0, (len(s) - 1) // seq_len) for s in self.shards])]).astype(np.int64)

    def window(self, shard: int, start: int, length: int) -> np.ndarray:
        return np.asarray(self.shards[shard].tokens[start : start + length], dtype=np.int64)

    def starts(self, shard: int, start: int, length: int) -> np.ndarray:
        """[length] bool: True where a document (its separator) starts in tokens [start, start+length)."""
        offsets = self.shards[shard].offsets
        lo, hi = np.searchsorted(offsets, [start, start + length])  # a binary search in the memory map
        out = np.zeros(length, dtype=bool)
        out[np.asarray(offsets[lo:hi], dtype=np.int64) - start] = True
        return out

    def longest_document(self) -> tuple[int, Path, int]:
        """(length, shard file, document index in the shard) of the longest document, reading the
        offsets in blocks (flat memory)."""
        best = (0, None, -1)
        for shard in self.shards:
            off = shard.offsets
            for a in range(0, off.shape[0] - 1, 1 << 20):
                lengths = np.diff(np.asarray(off[a : a + (1 << 20) + 1]))
                k = int(lengths.argmax())
                if lengths[k] > best[0]:
                    best = (int(lengths[k]), shard.file, a + k)
        return best


def read_manifest(path: Path) -> dict:
    """DIR/manifest.json, checked for its format; raises TaskError naming the file."""
    file = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise TaskError(f"{path}: no such corpus directory (prepare one with: lcsm data prepare SOURCE... --out {path})")
    if not file.exists():
        raise TaskError(f"{file}: missing: {path} is not a prepared corpus (lcsm data prepare SOURCE... --out {path})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{file}: cannot read the manifest ({e}); prepare the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TaskError(f"{file}: not an lcsm corpus manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version", 0) > VERSION:
        raise TaskError(f"{file}: corpus format version {manifest['version']} is newer than this lcsm reads ({VERSION}); upgrade lcsm")
    return manifest


def sha256_file(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # read, not mapped: hashing a large shard does not grow the RSS
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def open_split(path: Path, manifest: dict, name: str, verify: str = "size") -> Split:
    """The memory-mapped shards of split `name`, each checked against the manifest: present, of the
    size its token and document counts give, offsets from 0 to its length; with verify="checksum"
    also its sha256 (reads every shard once). Raises TaskError naming the file."""
    dtype = np.dtype(manifest["dtype"])
    entry = manifest["splits"].get(name)
    if entry is None or not entry.get("shards"):
        raise TaskError(f"{Path(path) / MANIFEST}: the corpus has no {name} split")
    shards = []
    for sh in entry["shards"]:
        shards.append(_open_shard(Path(path), sh, dtype, verify))
    return Split(name, shards, entry.get("sources", []))


def _open_shard(folder: Path, sh: dict, dtype: np.dtype, verify: str) -> Shard:
    again = "prepare the corpus again (lcsm data prepare)"
    for key, itemsize, count in (("file", dtype.itemsize, sh["tokens"]), ("index", 8, sh["documents"] + 1)):
        file = folder / sh[key]
        if not file.exists():
            raise TaskError(f"{file}: missing shard file (listed in {folder / MANIFEST}); {again}")
        size = file.stat().st_size
        if size != itemsize * count:
            raise TaskError(f"{file}: {size:,} bytes, expected {itemsize * count:,} ({count:,} × {itemsize}): truncated or corrupt; {again}")
        if verify == "checksum" and sha256_file(file) != sh[f"{key}_sha256"]:
            raise TaskError(f"{file}: its sha256 differs from the manifest's: corrupt; {again}")
    tokens = np.memmap(folder / sh["file"], dtype=dtype, mode="r", shape=(sh["tokens"],))
    offsets = np.memmap(folder / sh["index"], dtype=np.int64, mode="r", shape=(sh["documents"] + 1,))
    if int(offsets[0]) != 0 or int(offsets[-1]) != sh["tokens"]:
        raise TaskError(f"{folder / sh['index']}: the document offsets do not span the shard (0 ... {sh['tokens']}): corrupt; {again}")
    return Shard(folder / sh["file"], tokens, offsets)


# --------------------------------------------------------------------------- the order of rows


_M64 = (1 << 64) - 1


def _mix(x: int, key: int) -> int:
    """splitmix64's finaliser of x + key: a well-mixed 64-bit round function."""
    x = (x + key + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int) -> int:
    """The image of i under a bijection of [0, n) chosen by `key`: a 4-round Feistel network on the
    smallest even number of bits that holds n, walked until it lands inside [0, n) (a permutation of
    the larger range restricted this way is a permutation of [0, n)). O(1) memory for any n."""
    if not 0 <= i < n:
        raise ValueError(f"permute: {i} is outside [0, {n})")
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key + r) & mask)
        x = (left << half) | right
        if x < n:
            return x


class CorpusSampler(Sampler):
    """Training rows of a split: see the module docstring (packing: documents or windows)."""

    def __init__(self, split: Split, seq_len: int, packing: str, vocab_size: int):
        self.split, self.seq_len, self.packing, self.vocab_size = split, seq_len, packing, vocab_size
        self.cum_rows = split.rows(seq_len)
        self.n_rows = int(self.cum_rows[-1])
        # windows: the valid starts of every shard, end to end
        self.cum_starts = np.concatenate([[0], np.cumsum([max(0, len(s) - seq_len) for s in split.shards])]).astype(np.int64)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Rows per epoch // batch_size (the last partial batch of an epoch is left out: every batch
        has one shape)."""
        if self.n_rows < batch_size:
            raise TaskError(
                f"the {self.split.name} split has {self.n_rows} rows of seq_len + 1 = {self.seq_len + 1} tokens, fewer than "
                f"one batch of {batch_size}; use a larger corpus, a smaller task.seq_len or a smaller batch_size"
            )
        return self.n_rows // batch_size

    def locate(self, row: int) -> tuple[int, int]:
        """Row number -> (shard, first token)."""
        shard = int(np.searchsorted(self.cum_rows, row, side="right")) - 1
        return shard, (row - int(self.cum_rows[shard])) * self.seq_len

    def batch(self, batch_size: int, seed: int, step: int) -> Batch:
        R = self.seq_len + 1
        if self.packing == "windows":
            gen = torch.Generator().manual_seed(derive_seed(seed, "corpus-windows", step))
            where = torch.randint(0, int(self.cum_starts[-1]), (batch_size,), generator=gen).tolist()
            places = []
            for w in where:
                shard = int(np.searchsorted(self.cum_starts, w, side="right")) - 1
                places.append((shard, w - int(self.cum_starts[shard])))
        else:
            epoch, k = divmod(step, self.steps_per_epoch(batch_size))
            key = derive_seed(seed, "corpus-rows", epoch)
            places = [self.locate(permute(k * batch_size + b, self.n_rows, key)) for b in range(batch_size)]
        rows = torch.from_numpy(np.stack([self.split.window(s, a, R) for s, a in places]))
        self.check(rows, places)
        starts = None
        if self.packing == "documents":
            starts = torch.from_numpy(np.stack([self.split.starts(s, a, self.seq_len) for s, a in places]))
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), starts)

    def check(self, rows: torch.Tensor, places) -> None:
        if rows.numel() and int(rows.max()) >= self.vocab_size:
            b = int((rows >= self.vocab_size).any(1).nonzero()[0, 0])
            file = self.split.shards[places[b][0]].file
            raise TaskError(f"{file}: token id {int(rows[b].max())} near token {places[b][1]:,} is outside the vocabulary "
                            f"[0, {self.vocab_size}): corrupt shard or another tokenizer's; prepare the corpus again")


def eval_segment(split: Split, seq_len: int, windows: int | None, packing: str, vocab_size: int) -> Segment:
    """Up to `windows` validation rows at evenly spaced row numbers (all of them for None)."""
    sampler = CorpusSampler(split, seq_len, packing, vocab_size)
    n = sampler.n_rows
    if n < 1:
        raise TaskError(
            f"the {split.name} split has {split.tokens:,} tokens, less than one row of seq_len + 1 = {seq_len + 1}; "
            "use a smaller task.seq_len or prepare with a larger --val-fraction"
        )
    count = n if windows is None else min(windows, n)
    picks = np.linspace(0, n - 1, count).round().astype(np.int64).tolist()
    places = [sampler.locate(r) for r in picks]
    rows = torch.from_numpy(np.stack([split.window(s, a, seq_len + 1) for s, a in places]))
    sampler.check(rows, places)
    starts = torch.from_numpy(np.stack([split.starts(s, a, seq_len) for s, a in places])) if packing == "documents" else None
    return Segment(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), {"seq_len": seq_len}, starts=starts)


# --------------------------------------------------------------------------- config


class CorpusTask(TaskSpec):
    """Language modelling on a corpus prepared by `lcsm data prepare` (a directory of shards)."""

    kind: Literal["corpus"]
    path: str = Field(description="the corpus directory (its manifest.json)")
    seq_len: int = Field(512, ge=2, description="tokens per training row")
    packing: Literal["documents", "windows"] = Field(
        "documents", description="documents: rows of the stream, the state restarting at every document; windows: random windows"
    )
    long_documents: Literal["split", "error"] = Field(
        "split", description="a document longer than a row: split (it goes on in the next row, from a zero state) or error"
    )
    eval_windows: int | None = Field(256, ge=1, description="validation rows evaluated (evenly spaced); null: all")
    verify: Literal["size", "checksum"] = Field("size", description="check each shard's size (always) or also its sha256")
    vocab_size: int | None = Field(None, ge=2, description="the model's vocabulary; default: the tokenizer's (with EOS)")

    @model_validator(mode="after")
    def _vocabulary(self):
        # the model's vocabulary comes from the manifest; a run's config.yaml records it, so a run
        # is loaded (generate, export) without its corpus at hand
        try:
            manifest = read_manifest(Path(self.path))
        except TaskError as e:
            if self.vocab_size is not None:
                return self  # the data is checked when it is built
            raise FieldError("path", str(e)) from None
        need = int(manifest["tokenizer"]["model_vocab_size"])
        if self.vocab_size is None:
            self.vocab_size = need
        elif self.vocab_size < need:
            raise FieldError("vocab_size", f"{self.vocab_size} is smaller than the vocabulary of the corpus's tokenizer "
                             f"({need} tokens with EOS, {Path(self.path) / MANIFEST}); leave it out or give at least {need}")
        return self

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size

    def load_tokenizer(self, run_dir: Path):
        """The corpus's tokenizer as the run keeps it (RUN/corpus.json, RUN/tokenizer.json), else the corpus's own."""
        run_dir = Path(run_dir)
        if (run_dir / RUN_MANIFEST).exists():
            return load_tokenizer_info(json.loads((run_dir / RUN_MANIFEST).read_text())["tokenizer"], run_dir)
        return load_tokenizer_info(read_manifest(Path(self.path))["tokenizer"], Path(self.path))


# --------------------------------------------------------------------------- build


def build(task: CorpusTask, seed: int, run_dir: Path | None = None, log=lambda s: None, train: bool = True) -> TaskData:
    path = Path(task.path)
    manifest = read_manifest(path)
    tok = load_tokenizer_info(manifest["tokenizer"], path)
    if tok.vocab_size > task.vocab_size:
        raise TaskError(f"{path / MANIFEST}: the tokenizer's vocabulary ({tok.vocab_size} with EOS) exceeds the model's "
                        f"(task.vocab_size = {task.vocab_size}); prepare the corpus with a smaller tokenizer or raise task.vocab_size")
    val = open_split(path, manifest, "val", task.verify)
    sampler = None
    if train:
        split = open_split(path, manifest, "train", task.verify)
        if task.long_documents == "error":
            length, file, doc = split.longest_document()
            if length > task.seq_len + 1:
                raise TaskError(f"{file}: document {doc} has {length:,} tokens (with its separator), longer than a row of "
                                f"task.seq_len + 1 = {task.seq_len + 1}; raise task.seq_len or set task.long_documents: split")
        sampler = CorpusSampler(split, task.seq_len, task.packing, task.vocab_size)
        sampler.steps_per_epoch(1)  # a split without a row is an error here, before the model is built
        log(f"corpus {path}: {split.tokens:,} training tokens in {split.documents:,} documents, {len(split.shards)} shard(s), "
            f"{val.tokens:,} validation tokens; packing: {task.packing}")
    if run_dir is not None:
        keep_tokenizer(manifest, path, Path(run_dir))
    test = [eval_segment(val, task.seq_len, task.eval_windows, task.packing, task.vocab_size)]
    bpt = torch.zeros(task.vocab_size)
    b = tok.bytes_per_token()
    bpt[: b.numel()] = b[: task.vocab_size]
    return TaskData("corpus", task.vocab_size, [], test, bytes_per_token=bpt, tokenizer=tok, sampler=sampler)


def keep_tokenizer(manifest: dict, corpus: Path, run_dir: Path) -> None:
    """Copy the manifest (RUN/corpus.json) and the tokenizer file (RUN/tokenizer.json) into the run."""
    info = manifest["tokenizer"]
    if info.get("file"):
        target = run_dir / RUN_TOKENIZER
        if not target.exists() or sha256_file(target) != info.get("sha256"):
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(corpus / info["file"], tmp)
            tmp.replace(target)
    record = {**manifest, "tokenizer": {**info, "file": RUN_TOKENIZER if info.get("file") else None}, "path": str(corpus)}
    tmp = run_dir / (RUN_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / RUN_MANIFEST)


__all__ = ["CorpusTask", "CorpusSampler", "CorpusTokenizer", "HFTokenizer", "build", "permute", "read_manifest"]
