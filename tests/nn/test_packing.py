"""Packed documents: a row of several documents gives, at each document, what the document gives
alone — for every zoo model (the recurrence, conv tails, positions, cumsoftmax, MoM, attention), its
gradients too, and the errors."""

import pytest
import torch

from lcsm.config.paths import zoo_names
from lcsm.config.spec import ModelSpec, load_model_spec
from lcsm.nn.model import Model
from lcsm.nn.packing import Packing

VOCAB = 40
# two rows of 15 tokens: documents of 6, 1, 8 tokens and of 4, 11 (lengths 1 and a full row included)
ROWS = [[6, 1, 8], [4, 11]]
T = 15


def tiny_zoo(name: str, **changes) -> Model:
    """A zoo model at d_model 32, 2 layers (a hybrid: one of each mixer), its stages unchanged, in
    fp64; weights drawn larger than at init so that any leak across a boundary shows."""
    data = load_model_spec(name).model_dump(exclude_unset=True)
    data.update(d_model=32, n_layers=2, n_heads=2, vocab_size=VOCAB, **changes)
    if data.get("pattern"):
        data["pattern"] = ["mixer", *data["mixers"]]
        data["n_layers"] = len(data["pattern"])
    for key in ("heads", "head_k", "head_v"):
        data["mixer"].pop(key, None)
    osc = data["mixer"].get("oscillation", {})
    if osc.get("max_len"):  # cosFormer: make the angles move within a few tokens
        osc["max_len"] = 4
    torch.manual_seed(0)
    model = Model(ModelSpec.model_validate(data)).double().set_backend("torch")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def packed_batch(seed: int = 0):
    """tokens [2, T], cu_seqlens over the flattened rows, and the documents as (row, start, end)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(ROWS), T), generator=gen)
    cu, docs = [0], []
    for r, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            docs.append((r, start, start + n))
            start += n
            cu.append(r * T + start)
    return tokens, torch.tensor(cu), docs


def check_documents(model, name: str):
    tokens, cu, docs = packed_batch()
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)
        whole = model(tokens)  # the rows unpacked: documents see their predecessors
        for r, a, b in docs:
            alone = model(tokens[r : r + 1, a:b])[0]
            torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name} {r}:{a}-{b}: {m}")
    # the test has teeth: without cu_seqlens a later document's logits differ from its own
    r, a, b = docs[-1]
    assert (whole[r, a:b] - packed[r, a:b]).abs().max() > 1e-6, f"{name}: the leak the test looks for is not visible"


@pytest.mark.parametrize("name", zoo_names())
def test_a_packed_row_equals_each_document_alone(name):
    check_documents(tiny_zoo(name), name)


@pytest.mark.parametrize("path", ["dense", "sparse", "reference"])
def test_mixture_of_memories_restarts_every_memory_on_each_path(path):
    # per-memory stages with a convolution, a shared memory: every branch of the three paths
    mixer = {"kind": "eos", "expand": {"source": "data", "conv": 3}, "oscillation": {"kind": "scalar", "source": "data"},
             "routing": {"memories": 3, "top_k": 2, "shared": True, "per_memory": ["expand", "input"], "path": path}}
    check_documents(tiny_zoo("mom_scalar", mixer=mixer), f"mom {path}")


@pytest.mark.parametrize("name", ["mamba2", "hybrid_gla", "cumsoftmax"])
def test_gradients_of_a_packed_row_equal_the_documents_alone(name):
    model = tiny_zoo(name)
    tokens, cu, docs = packed_batch(1)
    labels = torch.randint(0, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(2))
    labels[0, 3] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    packed = torch.autograd.grad(model(tokens, labels, cu_seqlens=cu, reduction="sum"), params, allow_unused=True)
    total = sum(model(tokens[r : r + 1, a:b], labels[r : r + 1, a:b], reduction="sum") for r, a, b in docs)
    alone = torch.autograd.grad(total, params, allow_unused=True)
    for p, g, h in zip(params, packed, alone):
        if g is None or h is None:
            assert g is None and h is None
            continue
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-9)


def test_activation_checkpointing_recomputes_with_the_packing():
    model = tiny_zoo("gla")
    tokens, cu, _ = packed_batch()
    labels = torch.randint(0, VOCAB, tokens.shape)
    model.train()
    plain = torch.autograd.grad(model(tokens, labels, cu_seqlens=cu), list(model.parameters()))
    model.checkpoint_every = 1
    recomputed = torch.autograd.grad(model(tokens, labels, cu_seqlens=cu), list(model.parameters()))
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b)


def test_row_boundaries_are_document_boundaries_and_one_document_per_row_is_no_packing():
    model = tiny_zoo("mamba2")
    tokens, _, _ = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, cu_seqlens=torch.tensor([0, 2 * T])), model(tokens), rtol=1e-10, atol=1e-10)
    pk = Packing.of([0, 4, 4, 20, 30], 2, T, "cpu")  # an empty document, a row boundary (15) missing
    assert pk.cu_seqlens.tolist() == [0, 4, 15, 20, 30] and pk.lengths == (4, 11, 5, 10)
    assert pk.positions[:6].tolist() == [0, 1, 2, 3, 0, 1] and pk.positions[15].item() == 0
    assert pk.doc[[0, 4, 15, 20]].tolist() == [0, 1, 2, 3]


def test_bad_cu_seqlens_and_packing_with_a_cache_are_clear_errors():
    model = tiny_zoo("gla")
    tokens, _, _ = packed_batch()
    with pytest.raises(ValueError, match=r"start at 0 and end at B·T = 2·15 = 30"):
        model(tokens, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(tokens, cu_seqlens=torch.tensor([0, 20, 10, 30]))
    with pytest.raises(ValueError, match="integer"):
        model(tokens, cu_seqlens=torch.tensor([0.0, 30.0]))
    with pytest.raises(ValueError, match="with a cache"):
        model(tokens, cu_seqlens=torch.tensor([0, 30]), cache=[{} for _ in model.blocks])
