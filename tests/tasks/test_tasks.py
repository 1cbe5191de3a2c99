"""Task generators: MQAR as Zoology makes it, selective copying, induction heads, text; batching and caching."""

import pytest
import torch

from lcsm.config.recipe import load_recipe
from lcsm.tasks import IGNORE, TaskError, build_task, epoch_batches, sample_without_replacement, steps_per_epoch
from lcsm.tasks.copying import selective_copying
from lcsm.tasks.induction import induction_heads
from lcsm.tasks.mqar import multiquery_ar
from lcsm.tasks.text import read_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize("vocab,L,k", [(8192, 64, 4), (8192, 256, 16), (64, 32, 8), (100, 40, 10)])
def test_mqar_labels_only_at_queries_and_each_is_its_keys_value(vocab, L, k):
    inputs, labels = multiquery_ar(vocab, 200, L, k, seed=3, random_non_queries=True)
    assert inputs.shape == labels.shape == (200, L)
    half = vocab // 2
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * k : 2], x[1 : 2 * k : 2]
        assert len(set(keys)) == k and all(1 <= key < half for key in keys)
        assert all(half <= v < vocab for v in values)
        kv = dict(zip(keys, values))
        # no label inside the context; one label per key after it, at an even offset
        assert all(t == IGNORE for t in y[: 2 * k])
        queries = [t for t in range(L) if y[t] != IGNORE]
        assert len(queries) == k
        assert sorted(x[t] for t in queries) == sorted(keys)
        for t in queries:
            assert (t - 2 * k) % 2 == 0
            assert y[t] == kv[x[t]], "the target of a query is its key's value"


def test_mqar_without_random_filler_is_zero_off_the_queries():
    inputs, labels = multiquery_ar(64, 50, 32, 4, seed=0, random_non_queries=False)
    off = (labels == IGNORE) & (torch.arange(32) >= 8)
    assert (inputs[off] == 0).all()
    assert (inputs[labels != IGNORE] != 0).all()


def test_mqar_query_gaps_follow_the_power_law():
    # a = 0.01 puts most queries right after the context; a = 1 is uniform over the space
    def mean_gap(a):
        inputs, labels = multiquery_ar(8192, 2000, 256, 4, seed=1, power_a=a)
        pos = (labels != IGNORE).nonzero()[:, 1].float()
        return (pos - 8).mean().item() / 2

    assert mean_gap(0.01) < 0.6 * mean_gap(1.0)


def test_mqar_is_seeded_and_train_and_test_are_disjoint():
    a = multiquery_ar(8192, 100, 64, 4, seed=7)
    b = multiquery_ar(8192, 100, 64, 4, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    recipe = load_recipe(TINY_MQAR)
    data = build_task(recipe.task, seed=0)
    assert not torch.equal(data.train[0].inputs[:50], data.test[0].inputs[:50])
    train_rows = {tuple(r) for r in data.train[0].inputs.tolist()}
    assert not any(tuple(r) in train_rows for r in data.test[0].inputs.tolist())


def test_mqar_rejects_impossible_settings():
    with pytest.raises(TaskError, match="seq_len ≥ 32"):
        multiquery_ar(8192, 10, 16, 8, seed=0)
    with pytest.raises(TaskError, match="must be even"):
        multiquery_ar(8192, 10, 63, 4, seed=0)


def test_mqar_data_is_cached_under_a_hash_of_its_config(tmp_path):
    recipe = load_recipe(TINY_MQAR)
    first = build_task(recipe.task, seed=0)
    files = sorted((tmp_path / "cache").glob("mqar-*.pt"))
    assert len(files) == 2  # one train and one test setting
    again = build_task(recipe.task, seed=0)
    assert torch.equal(first.train[0].inputs, again.train[0].inputs)
    other = load_recipe(TINY_MQAR, ["task.power_a=0.5"])
    build_task(other.task, seed=0)
    assert len(list((tmp_path / "cache").glob("mqar-*.pt"))) == 4


def test_sampling_without_replacement_is_distinct():
    gen = torch.Generator().manual_seed(0)
    draw = sample_without_replacement(500, 20, 20, gen)
    assert all(sorted(r) == list(range(20)) for r in draw.tolist())
    weighted = sample_without_replacement(500, 30, 5, gen, log_weights=torch.zeros(30))
    assert all(len(set(r)) == 5 for r in weighted.tolist())


# --------------------------------------------------------------------------- copying, induction


def test_selective_copying_targets_are_the_tokens_in_order():
    inputs, labels = selective_copying(16, 100, 64, 8, seed=0)
    assert inputs.shape == labels.shape == (100, 64)
    for x, y in zip(inputs.tolist(), labels.tolist()):
        body, markers = x[:56], x[56:]
        assert markers == [15] * 8
        data = [t for t in body if t != 0]
        assert data == y[56:] and all(1 <= t <= 14 for t in data)
        assert all(t == IGNORE for t in y[:56])


def test_induction_answer_is_the_token_after_the_first_trigger():
    seqs = induction_heads(16, 200, 64, seed=0, induction_len=2, num_triggers=3)
    assert seqs.shape == (200, 64 + 1 + 2)
    for s in seqs.tolist():
        first = s.index(14)
        assert s[64] == 14
        assert s[-2:] == s[first + 1 : first + 3]
        assert 15 not in s
    recipe = load_recipe({**TINY_MQAR, "task": {"kind": "induction", "train": [{"seq_len": 32, "num_examples": 20}],
                                                  "test": [{"seq_len": 32, "num_examples": 20}]}})
    data = build_task(recipe.task, seed=0)
    assert (data.train[0].labels != IGNORE).all()
    assert (data.test[0].labels[:, :-1] == IGNORE).all() and (data.test[0].labels[:, -1] != IGNORE).all()


# --------------------------------------------------------------------------- text


def test_text_bytes_windows_and_held_out_tail():
    recipe = load_recipe({**TINY_MQAR, "task": {"kind": "text", "seq_len": 64}})
    data = build_task(recipe.task, seed=0)
    seg, val = data.train[0], data.test[0]
    assert data.vocab_size == 256 and recipe.model.vocab_size == 256
    assert torch.equal(seg.inputs[:, 1:], seg.labels[:, :-1])
    assert torch.equal(seg.inputs[1:, 0], seg.labels[:-1, -1])
    text = read_corpus("pydoc")
    assert len(val) * 65 < 0.06 * len(text.encode()) and len(seg) * 64 > 0.9 * len(text.encode())
    assert bytes(val.inputs[0].tolist()).decode("utf-8", "replace") in text


def test_text_folder_corpus_and_too_small_corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 400)
    (folder / "b.bin").write_bytes(bytes([0xFF, 0xFE, 0x00]) * 10)
    recipe = load_recipe({**TINY_MQAR, "task": {"kind": "text", "corpus": str(folder), "seq_len": 32, "val_fraction": 0.1}})
    assert len(build_task(recipe.task, seed=0).train[0]) > 10
    small = tmp_path / "small.txt"
    small.write_text("too short")
    recipe = load_recipe({**TINY_MQAR, "task": {"kind": "text", "corpus": str(small), "seq_len": 32}})
    with pytest.raises(TaskError, match="less than one context"):
        build_task(recipe.task, seed=0)


def test_text_bpe_is_trained_locally_and_saved(tmp_path):
    pytest.importorskip("tokenizers")
    recipe = load_recipe({**TINY_MQAR, "task": {"kind": "text", "seq_len": 64, "tokenizer": {"kind": "bpe", "vocab_size": 400}}})
    data = build_task(recipe.task, seed=0, run_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    assert recipe.model.vocab_size == 400 and int(data.train[0].inputs.max()) < 400
    ids = data.test[0].labels.flatten()
    # bits per byte needs the bytes each token spells: they add up to the text's bytes
    text = data.tokenizer.decode(ids.tolist())
    assert abs(data.bytes_per_token[ids].sum().item() - len(text.encode())) <= 4
    again = build_task(recipe.task, seed=0, run_dir=tmp_path)  # reloaded, not retrained
    assert torch.equal(again.test[0].inputs, data.test[0].inputs)


# --------------------------------------------------------------------------- batches


def test_epoch_batches_cover_every_example_once_and_are_seeded():
    recipe = load_recipe(TINY_MQAR)
    data = build_task(recipe.task, seed=0)
    batches = epoch_batches(data.train, 16, seed=0, epoch=0)
    assert len(batches) == steps_per_epoch(data.train, 16)
    seen = torch.cat([rows for _, rows in batches]).sort().values
    assert torch.equal(seen, torch.arange(len(data.train[0])))
    again = epoch_batches(data.train, 16, seed=0, epoch=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(epoch_batches(data.train, 16, seed=0, epoch=1)[0][1], batches[0][1])


TINY_MQAR = {
    "name": "tiny",
    "model": {"d_model": 16, "n_layers": 1, "mixer": {"kind": "eos", "oscillation": {"kind": "ones"}}, "channel_mixer": {"kind": "none"}},
    "task": {
        "kind": "mqar",
        "vocab_size": 64,
        "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 100}],
        "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 100}],
    },
    "steps": 4,
}
