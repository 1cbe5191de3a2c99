"""The PyTorch chunked and sequential paths against the fp64 reference loop: outputs, final
states and every gradient, for every decay form, gates of several strengths, lengths that are not
multiples of the chunk, initial states and packed sequences."""

import pytest
import torch

from lcsm.kernels import eos_recurrence
from lcsm.kernels.testing import DELTA, gates, rel_error
from lcsm.kernels.testing import FORMS as ALL_FORMS

B, T, H, K, V = 2, 37, 3, 5, 6  # T = 37 is not a multiple of any chunk size used
SCALES = {"weak": 1e-3, "moderate": 0.1, "strong": 5.0}


def make_gates(form: str, scale: float, dtype=torch.float64, gen=None):
    return gates(form, B, T, H, K, V, scale=scale, dtype=dtype, gen=gen)


FORMS = [f for f in ALL_FORMS if f not in DELTA]  # the delta forms need e matched to w: test_delta.py


def inputs(dtype=torch.float64, seed=0, batch=B, length=T):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, H, K, generator=gen, dtype=dtype)
    e = torch.randn(batch, length, H, K, generator=gen, dtype=dtype)
    i = torch.randn(batch, length, H, V, generator=gen, dtype=dtype)
    return s, e, i, gen


rel = rel_error


def run_with_grads(backend, s, e, i, gates, h0, chunk_size=None, cu_seqlens=None):
    leaves = {"s": s, "e": e, "i": i, "h0": h0, **gates}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y, ht = eos_recurrence(
        leaves["s"], leaves["e"], leaves["i"], h0=leaves["h0"], output_final_state=True,
        chunk_size=chunk_size, cu_seqlens=cu_seqlens, backend=backend,
        **{k: leaves[k] for k in gates},
    )
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    wh = torch.randn(ht.shape, generator=gen, dtype=ht.dtype)
    ((y * wy).sum() + (ht * wh).sum()).backward()
    return y, ht, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("strength", list(SCALES))
@pytest.mark.parametrize("form", FORMS)
def test_torch_path_matches_reference(form, strength):
    s, e, i, gen = inputs()
    gates = make_gates(form, SCALES[strength], gen=gen)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, gates, h0)
    y, ht, grads = run_with_grads("torch", s, e, i, gates, h0, chunk_size=8)
    assert rel(y, y_ref) < 1e-10
    assert rel(ht, ht_ref) < 1e-10
    for name, g in g_ref.items():
        assert rel(grads[name], g) < 1e-9, f"d{name}"


@pytest.mark.parametrize("form", ["scalar", "vector_k", "outer", "full_dt_A"])
def test_fp32_inputs_within_design_tolerance(form):
    s, e, i, gen = inputs(torch.float32)
    gates = {k: v.float() for k, v in make_gates(form, 0.1, gen=gen).items()}
    y, ht = eos_recurrence(s, e, i, output_final_state=True, backend="torch", **gates)
    y_ref, ht_ref = eos_recurrence(s.double(), e.double(), i.double(), output_final_state=True,
                                   backend="reference", **{k: v.double() for k, v in gates.items()})
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    assert rel(y.double(), y_ref) < 1e-4 and rel(ht.double(), ht_ref) < 1e-4


@pytest.mark.parametrize("form", ["scalar", "vector_k", "vector_v", "outer"])
def test_strong_decay_over_long_sequences_stays_finite(form):
    s, e, i, gen = inputs(torch.float32, length=700, batch=1)
    gates = {
        "scalar": {"g": -20.0 * torch.rand(1, 700, H)},
        "vector_k": {"gk": -20.0 * torch.rand(1, 700, H, K)},
        "vector_v": {"gv": -20.0 * torch.rand(1, 700, H, V)},
        "outer": {"gk": -20.0 * torch.rand(1, 700, H, K), "gv": -20.0 * torch.rand(1, 700, H, V)},
    }[form]
    y, ht = eos_recurrence(s, e, i, output_final_state=True, backend="torch", chunk_size=64, **gates)
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    y_ref, _ = eos_recurrence(s.double(), e.double(), i.double(), backend="reference",
                              **{k: v.double() for k, v in gates.items()})
    assert rel(y.double(), y_ref) < 1e-4


@pytest.mark.parametrize("form", ["vector_k", "full_dt_A", "scalar_static"])
def test_packed_sequences_equal_separate_runs(form):
    s, e, i, gen = inputs(batch=1)
    gates = make_gates(form, 0.1, gen=gen)
    gates = {k: (v[:1] if v.dim() >= 3 and v.shape[0] == B else v) for k, v in gates.items()}
    cu = torch.tensor([0, 9, 9, 30, T])  # an empty sequence included
    h0 = torch.randn(4, H, K, V, generator=gen, dtype=torch.float64)
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, gates, h0, cu_seqlens=cu)
    y, ht, grads = run_with_grads("torch", s, e, i, gates, h0, cu_seqlens=cu, chunk_size=4)
    assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 1e-9
    # and each segment alone gives the same output
    a, b = 9, 30
    part = {k: (v[:, a:b] if v.dim() >= 3 and v.shape[1] == T else v) for k, v in gates.items()}
    y_seg, _ = eos_recurrence(s[:, a:b], e[:, a:b], i[:, a:b], h0=h0[2:3], backend="reference", **part)
    assert rel(y[:, a:b], y_seg) < 1e-10


def test_bad_arguments_name_the_argument():
    s, e, i, _ = inputs()
    with pytest.raises(ValueError, match="'gk' has shape"):
        eos_recurrence(s, e, i, gk=torch.zeros(B, T, H, K + 1))
    with pytest.raises(ValueError, match="'i' has shape"):
        eos_recurrence(s, e, i[:, :-1])
    with pytest.raises(ValueError, match="'dt' needs 'A'"):
        eos_recurrence(s, e, i, dt=torch.zeros(B, T, H, V))
    with pytest.raises(ValueError, match="'h0' has shape"):
        eos_recurrence(s, e, i, h0=torch.zeros(B, H, V, K))
    with pytest.raises(ValueError, match="batch must be 1"):
        eos_recurrence(s, e, i, cu_seqlens=torch.tensor([0, T]))
    with pytest.raises(ValueError, match="backend 'cuda' is not known"):
        eos_recurrence(s, e, i, backend="cuda")
