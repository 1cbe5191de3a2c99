"""Corpora: `lcsm data prepare` (text, folders, JSONL, Parquet; bytes, BPE and Hugging Face
tokenizers), the shards and their index, the streaming sampler (a pure function of the seed and the
step, packed or in windows, memory flat in the corpus size), training and exact resumption from a
prepared folder of text, and the errors."""

import json
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from lcsm.cli.main import main
from lcsm.config.recipe import RecipeError, load_recipe
from lcsm.nn.model import Model
from lcsm.run.checkpoint import Checkpoint, verify
from lcsm.run.trainer import train
from lcsm.tasks import Batches, TaskError, build_task
from lcsm.tasks.corpus import permute, read_manifest
from lcsm.tasks.prepare import prepare

from helpers import cli_error, train_losses  # tests/helpers.py

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sat on warm mats".split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(5, 60))) + "." for _ in range(n)]


def text_folder(tmp_path, n: int = 30):
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    docs = texts(n)
    for i, t in enumerate(docs):
        (folder / ("more" if i % 4 == 0 else "") / f"d{i:03d}.txt").write_text(t)
    (folder / "blob.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    (folder / ".hidden").write_text("never read")
    return folder


def read_split(corpus, split: str) -> tuple[np.ndarray, np.ndarray]:
    m = read_manifest(corpus)
    sh = m["splits"][split]["shards"][0]
    return np.fromfile(corpus / sh["file"], dtype=m["dtype"]), np.fromfile(corpus / sh["index"], dtype=np.int64)


def recipe(corpus, tmp_path, **task):
    return {
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "channel_mixer": {"kind": "none"},
                  "mixer": {"kind": "eos", "expand": {"conv": 2}, "oscillation": {"kind": "scalar", "source": "data"}}},
        "task": {"kind": "corpus", "path": str(corpus), "seq_len": 32, "eval_windows": 4, **task},
        "optimizer": {"lr": 1e-2}, "batch_size": 4, "steps": 8, "eval_every": 4, "log_every": 1, "threads": 1,
        "out_dir": str(tmp_path / "run"),
    }


# --------------------------------------------------------------------------- prepare


def test_prepare_a_folder_of_text_as_bytes(tmp_path):
    folder = text_folder(tmp_path)
    m = prepare([str(folder)], "bytes", tmp_path / "c", val_fraction=0.1)
    assert m["tokenizer"]["eos_id"] == 256 and m["tokenizer"]["model_vocab_size"] == 257 and m["dtype"] == "uint16"
    assert m["documents"] == 30 and m["skipped"] == [str(folder / "blob.bin")]
    assert m["splits"]["val"]["documents"] == 3 and m["splits"]["train"]["documents"] == 27
    tokens, offsets = read_split(tmp_path / "c", "train")
    # EOS d1 EOS d2 ... EOS: every document after its separator, in the sorted order of the files
    files = sorted(p for p in folder.rglob("*.txt"))
    train_docs = [f.read_bytes() for k, f in enumerate(files) if k % 10 != 9]
    assert offsets[0] == 0 and offsets[-1] == len(tokens) and len(offsets) == 28
    for k, doc in enumerate(train_docs):
        a, b = offsets[k], offsets[k + 1] - (k == len(train_docs) - 1)  # the closing EOS is the last document's
        assert tokens[a] == 256 and bytes(tokens[a + 1 : b].tolist()) == doc
    assert tokens[-1] == 256


def test_jsonl_and_parquet_with_and_without_datasets_give_the_same_shards(tmp_path):
    pytest.importorskip("datasets")  # the test extra installs it (pyarrow with it)
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts(12, seed=1)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    pq.write_table(pa.table({"text": docs, "n": list(range(12))}), tmp_path / "docs.parquet")
    shards = {}
    for name, source, use in [("jsonl-plain", jsonl, False), ("jsonl-datasets", jsonl, True),
                              ("parquet-pyarrow", tmp_path / "docs.parquet", False), ("parquet-datasets", tmp_path / "docs.parquet", True)]:
        m = prepare([str(source)], "bytes", tmp_path / name, val_fraction=0.25, use_datasets=use)
        assert m["documents"] == 12
        shards[name] = [read_split(tmp_path / name, s)[0].tolist() for s in ("train", "val")]
    assert len({json.dumps(v) for v in shards.values()}) == 1
    assert bytes(shards["jsonl-plain"][0][1 : 1 + len(docs[0])]) == docs[0].encode()
    with pytest.raises(TaskError, match=r"docs.jsonl:1: no 'body' field \(found: id, text\)"):
        prepare([str(jsonl)], "bytes", tmp_path / "bad", text_key="body", use_datasets=False)
    with pytest.raises(TaskError, match="no 'body' column"):
        prepare([str(tmp_path / "docs.parquet")], "bytes", tmp_path / "bad2", text_key="body", use_datasets=False)


def hf_tokenizer_file(tmp_path):
    """A small byte-level BPE saved by `tokenizers` with an <|endoftext|> special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(50, seed=3), trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return tok, path


def test_a_hugging_face_tokenizer_file_is_used_as_is_with_its_eos(tmp_path):
    tok, path = hf_tokenizer_file(tmp_path)
    folder = text_folder(tmp_path, 8)
    m = prepare([str(folder)], f"hf:{path}", tmp_path / "c", val_fraction=0.2)
    info = m["tokenizer"]
    assert info["eos_token"] == "<|endoftext|>" and info["eos_id"] == tok.token_to_id("<|endoftext|>") == 1
    assert info["model_vocab_size"] == tok.get_vocab_size() and (tmp_path / "c" / "tokenizer.json").exists()
    tokens, offsets = read_split(tmp_path / "c", "train")
    first = sorted(folder.rglob("*.txt"))[0].read_text()
    assert tokens[1 : offsets[1]].tolist() == tok.encode(first, add_special_tokens=False).ids
    # a transformers tokenizer folder: its tokenizer_config.json names the EOS
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<pad>")
    fast.save_pretrained(tmp_path / "hf")
    m = prepare([str(folder)], f"hf:{tmp_path / 'hf'}", tmp_path / "c2", val_fraction=0.2)
    assert m["tokenizer"]["eos_token"] == "<pad>" and m["tokenizer"]["eos_id"] == 0
    data = build_task(load_recipe(recipe(tmp_path / "c2", tmp_path)).task, 0, train=False)
    assert data.tokenizer.decode(data.tokenizer.encode("the lazy dog")) == "the lazy dog"
    assert data.bytes_per_token[tok.token_to_id("the")] == 3 and data.bytes_per_token[0] == 0


def test_bpe_trained_on_the_sources_and_an_lcsm_bpe_file(tmp_path):
    folder = text_folder(tmp_path, 10)
    m = prepare([str(folder)], "bpe:300", tmp_path / "c", val_fraction=0.2)
    assert m["tokenizer"]["eos_token"] == "<|endoftext|>" and m["tokenizer"]["model_vocab_size"] <= 300
    m2 = prepare([str(folder)], f"bpe:{tmp_path / 'c' / 'tokenizer.json'}", tmp_path / "c2", val_fraction=0.2)
    assert read_split(tmp_path / "c", "train")[0].tolist() == read_split(tmp_path / "c2", "train")[0].tolist()
    assert m2["tokenizer"]["eos_id"] == m["tokenizer"]["eos_id"]


def test_one_long_document_is_split_into_train_and_val_and_big_vocabularies_take_uint32(tmp_path):
    (tmp_path / "one.txt").write_text("abc " * 1000)
    m = prepare([str(tmp_path / "one.txt")], "bytes", tmp_path / "c", val_fraction=0.1)
    assert m["splits"]["train"]["documents"] == m["splits"]["val"]["documents"] == 1
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == 4000 + 4


# --------------------------------------------------------------------------- the sampler


def test_permute_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(permute(i, n, key=12345) for i in range(n)) == list(range(n))
    assert [permute(i, 1000, 1) for i in range(10)] != [permute(i, 1000, 2) for i in range(10)]


def test_batches_are_a_pure_function_of_seed_and_step_and_packing_restarts_at_documents(tmp_path):
    prepare([str(text_folder(tmp_path, 60))], "bytes", tmp_path / "c", val_fraction=0.1)
    task = load_recipe(recipe(tmp_path / "c", tmp_path)).task
    data = build_task(task, seed=0)
    batches = Batches(data, 4, seed=0)
    a, b = batches.at(5), Batches(build_task(task, seed=0), 4, seed=0).at(5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.starts, b.starts)
    assert not torch.equal(a.tokens, Batches(data, 4, seed=1).at(5).tokens)
    assert torch.equal(a.labels[:, :-1], a.tokens[:, 1:])
    # a document starts exactly at its separator (EOS = 256), and only there
    assert torch.equal(a.starts, a.tokens == 256)
    # one epoch visits every row once
    spe = batches.steps_per_epoch
    rows = [tuple(r) for s in range(spe) for r in batches.at(s).tokens.tolist()]
    assert len(set(rows)) == len(rows) == spe * 4
    windows = build_task(task.model_copy(update={"packing": "windows"}), seed=0)
    w = Batches(windows, 4, seed=0).at(3)
    assert w.starts is None and torch.equal(w.tokens, Batches(windows, 4, seed=0).at(3).tokens)
    assert data.test[0].starts is not None and windows.test[0].starts is None


def test_memory_stays_flat_in_the_corpus_size(tmp_path):
    """A 3 GB shard (sparse on disk) is memory-mapped, never read: drawing batches and evaluating
    windows touch only their rows."""
    folder = tmp_path / "big"
    folder.mkdir()
    n = 3 << 29  # 1.6 G tokens, uint16
    for split in ("train", "val"):
        with open(folder / f"{split}-00000.bin", "wb") as f:
            f.truncate(2 * n)
        offsets = np.array([0, n // 3, n], dtype=np.int64)
        offsets.tofile(folder / f"{split}-00000.idx")
    shard = lambda s: {"file": f"{s}-00000.bin", "index": f"{s}-00000.idx", "tokens": n, "documents": 2,  # noqa: E731
                       "file_sha256": "", "index_sha256": ""}
    manifest = {"format": "lcsm-corpus", "version": 1, "dtype": "uint16",
                "tokenizer": {"kind": "bytes", "spec": "bytes", "vocab_size": 256, "eos_id": 256, "model_vocab_size": 257},
                "splits": {s: {"tokens": n, "documents": 2, "shards": [shard(s)]} for s in ("train", "val")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

    before = rss()
    task = load_recipe(recipe(folder, tmp_path, seq_len=1024, eval_windows=64)).task
    data = build_task(task, seed=0)
    batches = Batches(data, 8, seed=0)
    assert batches.steps_per_epoch == (n - 1) // 1024 // 8
    for step in range(0, 10**6, 10**5):
        assert batches.at(step).tokens.shape == (8, 1024)
    grown = rss() - before
    assert isinstance(data.sampler.split.shards[0].tokens, np.memmap)
    assert grown < 64 << 20, f"RSS grew by {grown / 2**20:.0f} MB for a {2 * n / 2**30:.1f} GB corpus"


# --------------------------------------------------------------------------- training


def test_prepare_and_train_from_the_command_line_resume_exactly(tmp_path, capsys, monkeypatch):
    """The flow of the README on a folder of text: lcsm data prepare, lcsm train; an interrupted and
    resumed run gives the losses of an uninterrupted one, step for step."""
    folder = text_folder(tmp_path, 60)
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "corpus"), "--val-fraction", "0.1"]) == 0
    assert "train" in capsys.readouterr().out
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("corpus", tmp_path)))  # relative: found beside the recipe
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(path), "--set", f"out_dir={tmp_path / 'whole'}"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    reference = train_losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 9))

    part = load_recipe(str(path), [f"out_dir={tmp_path / 'part'}"])
    result = train(part, quiet=True, on_step=lambda r: r["step"] == 3 and os.kill(os.getpid(), signal.SIGINT))
    assert result.status == "interrupted" and result.step == 3
    assert main(["train", str(path), "--set", f"out_dir={tmp_path / 'part'}", "--resume", "auto"]) == 0
    assert train_losses(tmp_path / "part") == reference
    assert (tmp_path / "part" / "corpus.json").exists()
    assert main(["eval", str(tmp_path / "part")]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_the_trainer_and_the_evaluator_pass_the_documents_to_the_model(tmp_path, monkeypatch):
    prepare([str(text_folder(tmp_path, 40))], "bytes", tmp_path / "c", val_fraction=0.1)
    seen = []
    real = Model.forward

    def spy(model, tokens, labels=None, *args, **kwargs):
        seen.append(kwargs.get("cu_seqlens"))
        return real(model, tokens, labels, *args, **kwargs)

    monkeypatch.setattr(Model, "forward", spy)
    train(load_recipe(recipe(tmp_path / "c", tmp_path, eval_windows=2), ["steps=2", "eval_every=2"]), quiet=True)
    assert len(seen) >= 3 and all(cu is not None and cu.numel() > 2 for cu in seen)
    seen.clear()
    train(load_recipe(recipe(tmp_path / "c", tmp_path, packing="windows"), ["steps=2", f"out_dir={tmp_path / 'w'}"]), quiet=True)
    assert seen and all(cu is None for cu in seen)


# --------------------------------------------------------------------------- errors


def test_bad_corpora_are_clear_errors_naming_the_file_or_field(tmp_path, capsys):
    folder = text_folder(tmp_path, 20)
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    capsys.readouterr()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "c", tmp_path)))
    assert "already holds a prepared corpus" in cli_error(["data", "prepare", str(folder), "--out", str(tmp_path / "c")], capsys)
    assert "no such file or folder" in cli_error(["data", "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capsys)
    assert "expected bytes, bpe:PATH" in cli_error(["data", "prepare", str(folder), "--tokenizer", "gpt2", "--out", str(tmp_path / "x")], capsys)
    err = cli_error(["train", str(path), "--set", f"task.path={tmp_path / 'nope'}"], capsys)
    assert "task.path" in err and "no such corpus directory" in err
    # the tokenizer's vocabulary exceeds the model's
    err = cli_error(["train", str(path), "--set", "task.vocab_size=100"], capsys)
    assert "task.vocab_size: 100 is smaller than the vocabulary of the corpus's tokenizer (257" in err
    # a document longer than a row
    err = cli_error(["train", str(path), "--set", "task.long_documents=error"], capsys)
    assert "train-00000.bin: document" in err and "longer than a row of task.seq_len + 1 = 33" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # a run in progress, then its shard is damaged: a clear error, and the run keeps its checkpoint
    run = load_recipe(str(path), ["steps=6", "eval_every=2"])
    assert train(run, quiet=True, on_step=lambda r: r["step"] == 2 and os.kill(os.getpid(), signal.SIGINT)).step == 2
    again = ["train", str(path), "--set", "steps=6", "--set", "eval_every=2", "--resume", "auto"]
    shard = tmp_path / "c" / "train-00000.bin"
    data = shard.read_bytes()
    tokens = np.frombuffer(data, dtype=np.uint16).copy()
    tokens[:] = 1000  # ids no byte tokenizer makes: another tokenizer's shard, or damage
    shard.write_bytes(tokens.tobytes())
    assert "sha256 differs" in cli_error(["data", "info", str(tmp_path / "c"), "--verify"], capsys)
    assert main(["data", "info", str(tmp_path / "c")]) == 0  # the sizes agree: only --verify sees it
    capsys.readouterr()
    err = cli_error(again, capsys)
    assert f"{shard}: token id 1000" in err and "outside the vocabulary [0, 257)" in err
    assert "the last good checkpoint (step 2) is kept" in err
    shard.write_bytes(data[:-2])
    err = cli_error(again, capsys)
    assert f"{shard}: " in err and "truncated or corrupt" in err
    kept = tmp_path / "run" / "checkpoint" / "step-000002"  # (lcsm/run/checkpoint.py's step folders)
    assert torch.load(kept / "trainer.pt", weights_only=True)["step"] == 2 and verify(Checkpoint(kept, 2)) is None
    shard.write_bytes(data)
    assert main(again) == 0  # the corpus repaired, the run goes on
    capsys.readouterr()
    shard.unlink()
    err = cli_error(["data", "info", str(tmp_path / "c")], capsys)
    assert f"{shard}: missing shard file" in err
    with pytest.raises(RecipeError, match="train-00000.bin: missing shard file"):
        train(load_recipe(str(path), ["steps=6", "eval_every=2"]), quiet=True, resume=True)
