"""The segment split of the chunked state passes (LCSM_STATE_SEGMENTS, lcsm/kernels/triton/segments.py):
the setting's parsing and the auto heuristic (pure Python), the segmented layout, the split state
passes against the unsplit ones for every separable decay form (only the state kernels run: cheap
under the interpreter), and whole calls against the fp64 reference with gradients, at 1 and 2 chunks
per segment on one head (the interpreter runs every program in turn)."""

import os
import subprocess
import sys

import pytest
import torch

from lcsm.kernels.decay import Decay
from lcsm.kernels.testing import SEPARABLE, gates
from lcsm.kernels.triton import autograd as ag
from lcsm.kernels.triton import segments as sg

from test_triton import DEVICE, compare  # tests/kernels is on sys.path (rootdir-relative imports)

needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the interpreter"
)


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("off", None), (" OFF ", None), ("auto", "auto"),
                                             ("Auto", "auto"), ("1", 1), ("16", 16)])
def test_the_setting_parses(value, expected):
    assert sg.parse_setting(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "on", "yes", "8 chunks"])
def test_a_bad_setting_names_the_variable_and_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"LCSM_STATE_SEGMENTS.*'off'.*'auto'.*positive integer"):
        sg.parse_setting(value)


def test_the_variable_is_read_when_autograd_is_imported():
    env = {**os.environ, "LCSM_STATE_SEGMENTS": "sometimes"}
    code = "import lcsm.kernels.triton.autograd"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "LCSM_STATE_SEGMENTS='sometimes'" in run.stderr
    env["LCSM_STATE_SEGMENTS"] = "3"
    code = "import lcsm.kernels.triton.autograd as a; assert a.STATE_SEGMENTS == 3"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_auto_splits_long_walks_on_small_grids_only():
    # many (sequence, head) pairs, or a short walk: no split
    assert sg.chunks_per_segment("auto", 8, 8, 512) is None  # 64 pairs
    assert sg.chunks_per_segment("auto", 64, 16, 4096) is None
    assert sg.chunks_per_segment("auto", 1, 8, 63) is None  # fewer than 64 chunks
    # GLA at 1×32768 with 8 heads (512 chunks), 2×8192 (128 chunks), one head of 1024 chunks
    for n_seq, H, chunks in [(1, 8, 512), (2, 8, 128), (1, 1, 1024), (3, 7, 200), (1, 63, 64)]:
        S = sg.chunks_per_segment("auto", n_seq, H, chunks)
        programs = n_seq * H * -(-chunks // S)
        assert S >= 8 and 64 <= programs <= 128, (n_seq, H, chunks, S, programs)
    assert sg.chunks_per_segment("auto", 1, 8, 512) == 32
    # off; an integer is taken as is, unless one segment covers the longest sequence
    assert sg.chunks_per_segment(None, 1, 1, 10_000) is None
    assert sg.chunks_per_segment(2, 64, 64, 5) == 2
    assert sg.chunks_per_segment(5, 1, 1, 5) is None


def test_the_switch_off_is_the_unsplit_path(monkeypatch):
    monkeypatch.setattr(ag, "STATE_SEGMENTS", None)
    lay = ag.Layout(1, 1000, None, "cpu")
    assert ag.segments_of(None, lay, 1, "cpu") is None


# --------------------------------------------------------------------------- the segmented layout


def test_a_batch_is_segmented_over_its_flattened_tokens():
    # [2, 300] at 2 chunks (128 tokens) per segment: 128 + 128 + 44 tokens per sequence
    p = sg.SegmentPlan(torch.tensor([0, 300]), torch.tensor([300, 300]), 2, "cpu")
    assert p.cu.tolist() == [0, 128, 256, 300, 428, 556, 600]
    assert p.chunk_off.tolist() == [0, 2, 4, 5, 7, 9, 10]  # the original chunk ids: 5 per sequence
    assert (p.N, p.n_chunks, p.n_seq, p.J, p.regular) == (6, 10, 2, 3, False)
    assert p.chunk_seg.tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert p.chunk_last.tolist() == [63, 127, 191, 255, 299, 363, 427, 491, 555, 599]
    assert p.chunk_len.tolist() == [64.0] * 4 + [44.0] + [64.0] * 4 + [44.0]
    assert p.seg_slot.tolist() == list(range(6))
    # packed lengths 5, 0 (no segment), 300, 128
    p = sg.SegmentPlan(torch.tensor([0, 5, 5, 305]), torch.tensor([5, 0, 300, 128]), 2, "cpu")
    assert p.cu.tolist() == [0, 5, 133, 261, 305, 433]
    assert p.chunk_off.tolist() == [0, 1, 3, 5, 6, 8]
    assert (p.J, p.seg_slot.tolist()) == (3, [0, 6, 7, 8, 9])
    lay = ag.Layout(1, 433, torch.tensor([0, 5, 5, 305, 433]), "cpu")
    assert lay.n_chunks == p.n_chunks


# --------------------------------------------------------------------------- the split passes


K, V = 12, 20


def state_passes(form, S, monkeypatch, cu=None, B=2, T=150, with_h0=True, seed=0):
    """(h, ht, dh, dh0) of the unsplit and the split state passes for the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    H = 1
    q, k = (torch.randn(B, T, H, K, generator=gen).to(DEVICE) for _ in range(2))
    v, do = (torch.randn(B, T, H, V, generator=gen).to(DEVICE) for _ in range(2))
    h0, dht = ((torch.randn(N, H, K, V, generator=gen).to(DEVICE) if with_h0 else None) for _ in range(2))
    decay = Decay(**{n: x.to(DEVICE) for n, x in gates(form, B, T, H, K, V, scale=0.3, gen=gen).items()}).fold_scalar()
    lay = ag.Layout(B, T, None if cu is None else cu.to(DEVICE), DEVICE)
    gt = ag.Gates(decay, lay)
    out = []
    for setting in (None, S):
        monkeypatch.setattr(ag, "STATE_SEGMENTS", setting)
        seg = ag.segments_of(gt, lay, H, DEVICE)
        assert (seg is None) == (setting is None)
        h, ht = ag.chunk_states(k, v, gt, h0, lay, True, seg)
        dh, dh0 = ag.chunk_state_grads(q, do, gt, dht, True, lay, seg)
        out.append((h, ht, dh, dh0))
    return out


def close(a, b):
    return (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())


@needs_kernels
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("form", SEPARABLE)
def test_split_state_passes_equal_the_unsplit_ones(form, S, monkeypatch):
    # 150 tokens: 3 chunks, the last of 22 tokens; at S = 2 the last segment has one chunk
    unsplit, split = state_passes(form, S, monkeypatch)
    for name, a, b in zip(("h", "ht", "dh", "dh0"), split, unsplit):
        assert close(a, b), (name, (a - b).abs().max().item())


@needs_kernels
@pytest.mark.parametrize("with_h0", [True, False])
def test_split_state_passes_of_packed_sequences(with_h0, monkeypatch):
    # lengths 5, 0, 145 (two segments, the second of 17 tokens), 150 and 40: shorter than a segment
    cu = torch.tensor([0, 5, 5, 150, 300, 340])
    unsplit, split = state_passes("outer", 2, monkeypatch, cu=cu, B=1, T=340, with_h0=with_h0)
    for name, a, b in zip(("h", "ht", "dh", "dh0"), split, unsplit):
        assert (a is None) == (b is None) and (a is None or close(a, b)), name


# --------------------------------------------------------------------------- whole calls against fp64


@pytest.fixture
def split(monkeypatch):
    """Sets the switch to a number of chunks per segment and counts the split passes taken."""
    calls = []
    for name in ("fix_states", "fix_state_grads"):
        real = getattr(sg, name)
        monkeypatch.setattr(sg, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))

    def set_to(S):
        monkeypatch.setattr(ag, "STATE_SEGMENTS", S)
        return calls

    return set_to


@needs_kernels
@pytest.mark.parametrize("form, S, T", [("scalar", 1, 150), ("scalar_static", 2, 150), ("vector_k", 2, 200),
                                        ("vector_v", 1, 150), ("outer", 2, 150)])
def test_split_calls_match_the_reference(form, S, T, split):
    # h0, the final state and its gradient dht, every gradient; the forward's states (kept for the
    # backward, not walked again) and the state gradients in the backward, both split
    calls = split(S)
    gen = torch.Generator().manual_seed(1)
    compare(gates(form, 1, T, 1, K, V, scale=0.3, gen=gen), length=T, heads=1)
    assert calls == ["fix_states", "fix_state_grads"]


@needs_kernels
def test_split_calls_of_packed_sequences_match_the_reference(split):
    calls = split(2)
    gen = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 5, 150, 300, 340])
    compare(gates("vector_k", 1, 340, 1, K, V, scale=0.3, gen=gen), cu_seqlens=cu, length=340, heads=1)
    assert calls == ["fix_states", "fix_state_grads"]
