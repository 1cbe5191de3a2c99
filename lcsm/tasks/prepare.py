"""`lcsm data prepare`: text files, folders, JSONL and Parquet -> a corpus directory of token shards.

    prepare(sources, tokenizer="bytes" | "bpe:PATH" | "bpe:N" | "hf:PATH", out=DIR, ...)

Documents: a text file is one document; a folder gives its files (recursively, sorted, hidden ones
and binaries skipped); a JSONL line or a Parquet row is one document (its `text_key` field). JSONL
and Parquet go through `datasets` when it is installed (streaming, local files only: nothing is
downloaded or cached), JSONL also without it, Parquet then through pyarrow.

Tokenizers: bytes (256 tokens, EOS appended as 256); bpe:PATH an lcsm byte-level BPE tokenizer.json
(as a text run saves it); bpe:N trains one of N tokens on the sources first (streaming); hf:PATH a
Hugging Face tokenizer.json (or a folder holding one), used as is so that perplexities compare with
other work. The EOS separator is the tokenizer's own (`eos` argument, tokenizer_config.json's
eos_token, or a usual name such as <|endoftext|>), else one id appended after the vocabulary.

Memory holds one document at a time (plus one shard's offsets), never the corpus; the shards are
written as the documents come, each under a temporary name until it is complete. The layout of the
directory is described in lcsm/tasks/corpus.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lcsm.tasks.base import TaskError
from lcsm.tasks.corpus import FORMAT, MANIFEST, VERSION, ByteTokenizer, CorpusTokenizer, HFTokenizer
from lcsm.tasks.text import BPETokenizer

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")
TEXT_SUFFIXES_STRUCTURED = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
LONG_TEXT = 1 << 20  # characters: a longer document is encoded in pieces cut after line ends


# --------------------------------------------------------------------------- sources


def list_files(sources: list[str]) -> list[tuple[Path, str]]:
    """(file, format) for every source: a file, or a folder's files recursively (sorted; hidden skipped)."""
    out = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise TaskError(f"{source}: no such file or folder")
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        for f in files:
            out.append((f, TEXT_SUFFIXES_STRUCTURED.get(f.suffix.lower(), "text")))
    if not out:
        raise TaskError(f"{', '.join(sources)}: no files to read")
    return out


def _has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def read_documents(file: Path, fmt: str, text_key: str, use_datasets: bool, skipped: list) -> Iterator[tuple[str, int]]:
    """Yields (text, bytes read) per document of one file; a text file that is not UTF-8 is skipped
    (listed in `skipped`)."""
    if fmt == "text":
        try:
            data = file.read_bytes()
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(str(file))
            yield None, len(data)  # no document; its bytes still count as read
            return
        except OSError as e:
            raise TaskError(f"{file}: cannot read ({e.strerror})") from None
        yield text, len(data)
        return
    if use_datasets:
        yield from _read_with_datasets(file, fmt, text_key)
        return
    if fmt == "jsonl":
        yield from _read_jsonl(file, text_key)
    else:
        yield from _read_parquet(file, text_key)


def _field(record, text_key: str, file: Path, where: str) -> str:
    if not isinstance(record, dict) or text_key not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise TaskError(f"{file}:{where}: no '{text_key}' field (found: {keys}); choose the field with --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise TaskError(f"{file}:{where}: the '{text_key}' field is {type(text).__name__}, not text")
    return text


def _read_jsonl(file: Path, text_key: str) -> Iterator[tuple[str, int]]:
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TaskError(f"{file}:{n}: not a JSON line ({e})") from None
            yield _field(record, text_key, file, str(n)), len(line)


def _read_parquet(file: Path, text_key: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(f"{file}: reading Parquet needs 'datasets' or 'pyarrow': pip install 'lcsm[data]'") from None
    try:
        pf = pq.ParquetFile(str(file))
    except Exception as e:
        raise TaskError(f"{file}: not a Parquet file ({str(e).splitlines()[0]})") from None
    if text_key not in pf.schema_arrow.names:
        raise TaskError(f"{file}: no '{text_key}' column (found: {', '.join(pf.schema_arrow.names)}); choose it with --text-key")
    size, rows = file.stat().st_size, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):  # one batch of rows in memory
        for text in batch.column(0).to_pylist():
            yield ("" if text is None else str(text)), size // rows


def _read_with_datasets(file: Path, fmt: str, text_key: str) -> Iterator[tuple[str, int]]:
    import datasets

    builder = "json" if fmt == "jsonl" else "parquet"
    try:
        # streaming: rows are read as they are needed, nothing is written to the datasets cache
        ds = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True)
        size = file.stat().st_size
        first = True
        for n, record in enumerate(ds, 1):
            if first and text_key not in record:
                raise TaskError(f"{file}: no '{text_key}' field (found: {', '.join(record)}); choose the field with --text-key")
            first = False
            text = record[text_key]
            yield ("" if text is None else str(text)), 0
        yield None, size  # the file's bytes, for the progress bar, once it is read
    except TaskError:
        raise
    except Exception as e:  # datasets' parse errors (ArrowInvalid, DatasetGenerationError, ...)
        raise TaskError(f"{file}: cannot read as {fmt} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# --------------------------------------------------------------------------- tokenizers


def make_tokenizer(spec: str, files: list[tuple[Path, str]], out: Path, eos: str | None, text_key: str, use_datasets: bool,
                   log: Callable[[str], None]) -> tuple[CorpusTokenizer, Path | None]:
    """The tokenizer named by --tokenizer, with its EOS; and its file to copy into the corpus (None for bytes)."""
    kind, _, arg = spec.partition(":")
    if kind == "bytes" and not arg:
        return _with_eos(ByteTokenizer(), "bytes", spec, None, eos), None
    if kind == "bpe" and arg.isdigit():
        vocab = int(arg)
        if not 257 <= vocab <= 1 << 20:
            raise TaskError(f"--tokenizer bpe:{vocab}: a byte-level BPE needs 257 to {1 << 20} tokens")
        log(f"training a byte-level BPE of {vocab} tokens on the sources")
        file = out / "tokenizer.json"
        tok = train_bpe(files, vocab, text_key, use_datasets)
        tok.save(file)
        return _with_eos(tok, "bpe", spec, file, eos or "<|endoftext|>"), file
    if kind in ("bpe", "hf") and arg:
        path = Path(arg).expanduser()
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            else:
                raise TaskError(f"--tokenizer {spec}: {path} holds no tokenizer.json (save the tokenizer with "
                                "tokenizer.save_pretrained(DIR) from transformers, or tokenizer.save(FILE) from tokenizers)")
        if not path.exists():
            raise TaskError(f"--tokenizer {spec}: {path}: no such file")
        if kind == "bpe":
            try:
                tok = BPETokenizer.load(path)
            except TaskError:
                raise
            except Exception as e:
                raise TaskError(f"--tokenizer {spec}: {path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
        else:
            tok = HFTokenizer.load(path)
        if eos is None and kind == "hf":
            eos = _configured_eos(path.parent)
        return _with_eos(tok, kind, spec, path, eos), path
    raise TaskError(f"--tokenizer {spec}: expected bytes, bpe:PATH (a tokenizer.json), bpe:N (train N tokens) or hf:PATH")


def _configured_eos(folder: Path) -> str | None:
    """The eos_token of a transformers tokenizer folder's tokenizer_config.json, if any."""
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return None
    try:
        value = json.loads(config.read_text()).get("eos_token")
    except (OSError, json.JSONDecodeError):
        return None
    return value.get("content") if isinstance(value, dict) else value


def _with_eos(tok, kind: str, spec: str, file: Path | None, eos: str | None) -> CorpusTokenizer:
    base_vocab = tok.vocab_size

    def token_id(token: str) -> int | None:
        inner = getattr(tok, "tok", None)  # the tokenizers.Tokenizer of a bpe or hf tokenizer
        return None if inner is None else inner.token_to_id(token)

    eos_id, eos_token = None, None
    if eos is not None and kind != "bytes":
        eos_id = token_id(eos)
        if eos_id is None:
            raise TaskError(f"--eos {eos}: the tokenizer ({spec}) has no such token")
        eos_token = eos
    elif eos is not None:
        raise TaskError("--eos: the bytes tokenizer has no tokens to name; its EOS is id 256")
    elif kind != "bytes":
        for name in EOS_NAMES:
            found = token_id(name)
            if found is not None:
                eos_id, eos_token = found, name
                break
    if eos_id is None:  # no separator in the vocabulary: one id after it
        eos_id = base_vocab
    info = {
        "kind": kind, "spec": spec, "file": "tokenizer.json" if file is not None else None,
        "vocab_size": base_vocab, "eos_id": int(eos_id), "eos_token": eos_token,
        "model_vocab_size": max(base_vocab, int(eos_id) + 1),
    }
    return CorpusTokenizer(tok, int(eos_id), info["model_vocab_size"], info)


def train_bpe(files, vocab: int, text_key: str, use_datasets: bool) -> BPETokenizer:
    """A byte-level BPE trained on the documents streamed from the files, <|endoftext|> its first special token."""
    t = BPETokenizer._lib()
    tok = t.Tokenizer(t.models.BPE())
    tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = t.decoders.ByteLevel()
    trainer = t.trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                    initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        skipped = []
        for file, fmt in files:
            for text, _ in read_documents(file, fmt, text_key, use_datasets, skipped):
                if text:
                    yield text

    tok.train_from_iterator(texts(), trainer)
    return BPETokenizer(tok)


def encode(tok: CorpusTokenizer, text: str) -> list[int]:
    """A document's ids; a very long one in pieces cut after a line end followed by a non-space
    (where no byte-level pre-tokenizer merges across), so memory holds one piece of it at a time."""
    if len(text) <= LONG_TEXT:
        return tok.encode(text)
    ids, start = [], 0
    while start < len(text):
        end = start + LONG_TEXT
        while end < len(text) and not (text[end - 1] == "\n" and not text[end].isspace()):
            end += 1
        ids += tok.encode(text[start:end])
        start = end
    return ids


# --------------------------------------------------------------------------- writing shards


class ShardWriter:
    """The shards of one split: EOS before every document and at the end; rolls at shard_tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, eos: int, shard_tokens: int):
        self.out, self.split, self.dtype, self.eos, self.shard_tokens = out, split, dtype, eos, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):05d}"
        self.name, self.n, self.offsets = name, 0, []
        self.hash = hashlib.sha256()
        self.file = open(self.out / f"{name}.bin.tmp", "wb")

    def _write(self, ids) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.n += len(ids)

    def add(self, ids: list[int]) -> None:
        if self.file is None:
            self._open()
        self.offsets.append(self.n)
        self._write([self.eos])
        self._write(ids)
        if self.n >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.file is None:
            return
        self._write([self.eos])  # the last document's end: its final label
        self.file.close()
        self.file = None
        offsets = np.asarray(self.offsets + [self.n], dtype=np.int64).tobytes()
        (self.out / f"{self.name}.idx.tmp").write_bytes(offsets)
        for suffix in (".bin", ".idx"):
            os.replace(self.out / f"{self.name}{suffix}.tmp", self.out / f"{self.name}{suffix}")
        self.shards.append({"file": f"{self.name}.bin", "index": f"{self.name}.idx", "tokens": self.n,
                            "documents": len(self.offsets), "file_sha256": self.hash.hexdigest(),
                            "index_sha256": hashlib.sha256(offsets).hexdigest()})

    @property
    def documents(self) -> int:
        """Documents added so far (written shards and the open one)."""
        return sum(s["documents"] for s in self.shards) + (len(self.offsets) if self.file is not None else 0)

    def summary(self) -> dict:
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": sum(s["documents"] for s in self.shards),
                "shards": self.shards}


def prepare(sources: list[str], tokenizer: str, out: str | Path, *, val_fraction: float = 0.01, text_key: str = "text",
            eos: str | None = None, shard_tokens: int = 1 << 27, overwrite: bool = False, use_datasets: bool | None = None,
            progress=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Tokenise the sources into the corpus directory `out`; returns the manifest.

    Every round(1 / val_fraction)-th document goes to the validation split (at least one document
    when there are two or more; a single document gives the tail val_fraction of its tokens).
    progress: a rich Progress to show (None: none). Raises TaskError for bad input."""
    if not 0 < val_fraction < 0.5:
        raise TaskError(f"--val-fraction must be in (0, 0.5) (got {val_fraction})")
    if shard_tokens < 1:
        raise TaskError(f"--shard-tokens must be positive (got {shard_tokens})")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise TaskError(f"--out {out}: exists and is not a directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise TaskError(f"--out {out}: already holds a prepared corpus; pass --overwrite to replace it")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists() and not overwrite:
        raise TaskError(f"--out {out}: a folder that is not empty; give a new or empty folder (or --overwrite)")
    files = list_files(sources)
    use_datasets = _has_datasets() if use_datasets is None else use_datasets
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*")) + list(out.glob("val-*")) + [out / MANIFEST]:
        old.unlink(missing_ok=True)  # --overwrite: lcsm's own files only
    tok, tok_file = make_tokenizer(tokenizer, files, out, eos, text_key, use_datasets, log)
    if tok_file is not None and tok_file.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tok_file, out / "tokenizer.json")
    vocab = tok.vocab_size
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    writers = {name: ShardWriter(out, name, dtype, tok.eos_id, shard_tokens) for name in ("train", "val")}
    every = max(2, round(1 / val_fraction))
    total_bytes = sum(f.stat().st_size for f, _ in files)
    bar = progress.add_task("tokenising", total=total_bytes) if progress is not None else None
    started = time.perf_counter()
    n_docs, n_bytes, held, skipped, per_source = 0, 0, None, [], []
    for file, fmt in files:
        docs_before = n_docs
        for text, size in read_documents(file, fmt, text_key, use_datasets, skipped):
            if bar is not None and size:
                progress.advance(bar, size)
            if text is None:
                continue
            n_bytes += len(text.encode("utf-8")) if fmt != "text" else size
            ids = encode(tok, text)
            # hold one document back: with no validation document by the end, the last one becomes one
            if held is not None:
                writers["val" if (n_docs - 1) % every == every - 1 else "train"].add(held)
            held = ids
            n_docs += 1
        per_source.append({"path": str(file), "format": fmt, "documents": n_docs - docs_before})
    if held is None:
        raise TaskError(f"{', '.join(sources)}: no documents (skipped, not UTF-8 text: {', '.join(skipped[:5]) or 'none'})")
    last = n_docs - 1
    if last % every == every - 1 or (n_docs > 1 and not writers["val"].documents):
        writers["val"].add(held)  # the last document's turn, or the only validation document
    elif n_docs == 1:
        cut = max(1, int(len(held) * (1 - val_fraction)))
        writers["train"].add(held[:cut])
        writers["val"].add(held[cut:])
    else:
        writers["train"].add(held)
    for w in writers.values():
        w.close()
    splits = {name: w.summary() for name, w in writers.items()}
    if not splits["train"]["shards"]:
        raise TaskError(f"{', '.join(sources)}: too few documents for a training and a validation split")
    info = dict(tok.info)
    if info.get("file"):
        info["sha256"] = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "tokenizer": info, "splits": splits,
        "documents": n_docs, "bytes": n_bytes, "val_fraction": val_fraction, "text_key": text_key,
        "sources": per_source, "skipped": skipped, "seconds": round(time.perf_counter() - started, 3),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)  # last: a directory without a manifest is not a corpus yet
    return manifest
