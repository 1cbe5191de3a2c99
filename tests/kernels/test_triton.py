"""The Triton kernels (under the interpreter on the CPU) against the fp64 reference: outputs, final
states and every gradient, gates included, for every decay form, static and per token, at weak,
moderate and strong log gates, with initial states, packed sequences, lengths that are not
multiples of the chunk, K != V and sizes that are not powers of two.

The interpreter runs every program of a grid in turn, so the time goes with batch × heads × length
(and, for the scan kernels' element-wise associative scan, with the K and V tiles): every form is
checked with a batch of two at moderate gates, the layouts (packed sequences, the inference
forward, mixed dtypes, the decoding step) with two heads, and the numerical regimes (weak and
strong gates, fp16 inputs, no initial or final state, a long sequence at strong decay) on one
sequence of one head, as are the backward's cases of a decay along K; the scan kernels (the full decays) run blocks of 16 tokens, so they get
their own shorter length.

bf16 is not checked here: the interpreter's bf16 matrix products are wrong (Triton 3.6 and 3.9);
the GPU run of `lcsm bench kernels --check` covers it."""

import os

import pytest
import torch

from lcsm.kernels import eos_recurrence, eos_step
from lcsm.kernels.testing import gates, rel_error

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the interpreter"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, K, V = 1, 70, 2, 12, 20  # two chunks of 64, the second with 6 tokens
SCAN_KV = (3, 5)  # the scan kernels hold [16, K, V] tiles: the interpreter wants them small
SCAN_T = 38  # three scan blocks of 16 tokens, the last with 6
TOL = 1e-4 if DEVICE == "cpu" else 5e-3  # fp32 against fp64; GPU fp32 products use tf32 (docs/kernels.md)


def dims(form):
    return SCAN_KV if form.startswith("full") else (K, V)


def length_of(form):
    return SCAN_T if form.startswith("full") else T


def gates_for(form, scale, gen, batch=B, length=None, heads=H):
    """Log gates; `scale` is the total log decay per step (split in two for forms with two decays)."""
    return gates(form, batch, length or length_of(form), heads, *dims(form), scale=scale, gen=gen)


rel = rel_error


def compare(gates, dtype=torch.float32, tol=TOL, cu_seqlens=None, batch=B, length=T, seed=0, with_h0=True,
            with_dht=True, kv=(K, V), heads=H):
    K, V, H = *kv, heads
    gen = torch.Generator().manual_seed(seed)
    N = batch if cu_seqlens is None else len(cu_seqlens) - 1
    leaves = {
        "s": torch.randn(batch, length, H, K, generator=gen),
        "e": torch.randn(batch, length, H, K, generator=gen),
        "i": torch.randn(batch, length, H, V, generator=gen),
        **gates,
    }
    if with_h0:
        leaves["h0"] = torch.randn(N, H, K, V, generator=gen)
    ours = {n: x.to(DEVICE, dtype if n in "sei" else torch.float32).clone().requires_grad_() for n, x in leaves.items()}
    ref = {n: x.double().clone().requires_grad_() for n, x in leaves.items()}
    cu_ours = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    args = lambda L, cu: dict(h0=L.get("h0"), output_final_state=True, cu_seqlens=cu, **{n: L[n] for n in gates})  # noqa: E731
    y, ht = eos_recurrence(ours["s"], ours["e"], ours["i"], backend="triton", **args(ours, cu_ours))
    y_ref, ht_ref = eos_recurrence(ref["s"], ref["e"], ref["i"], backend="reference", **args(ref, cu_seqlens))
    assert y.dtype == dtype and ht.dtype == torch.float32
    wy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    wh = torch.randn(ht_ref.shape, generator=gen, dtype=torch.float64) * with_dht
    ((y.double().cpu() * wy).sum() + (ht.double().cpu() * wh).sum()).backward()
    ((y_ref * wy).sum() + (ht_ref * wh).sum()).backward()
    errors = {"y": rel(y, y_ref), "ht": rel(ht, ht_ref)}
    errors.update({f"d{n}": rel(ours[n].grad, ref[n].grad) for n in leaves})
    assert all(torch.isfinite(ours[n].grad).all() for n in leaves)
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


SEPARABLE = ["ones", "scalar", "scalar_static", "vector_k", "vector_k_static", "vector_v", "vector_v_static",
             "outer", "scalar_and_vector_k", "scalar_and_vector_v"]
FULL = ["full_dt_A", "full_static", "full"]


@pytest.mark.parametrize("form", SEPARABLE + FULL)
def test_moderate_gates(form):
    # a batch of two: the batch offsets of every form, gradients included
    gen = torch.Generator().manual_seed(1)
    compare(gates_for(form, 0.1, gen, batch=2), batch=2, length=length_of(form), kv=dims(form))


@pytest.mark.parametrize("form", ["scalar", "scalar_static", "vector_k", "vector_k_static", "vector_v", "outer", "full_dt_A"])
def test_strong_gates(form):
    gen = torch.Generator().manual_seed(2)
    compare(gates_for(form, 5.0, gen, heads=1), length=length_of(form), kv=dims(form), heads=1)


@pytest.mark.parametrize("form", ["scalar", "vector_k", "outer", "full"])
def test_weak_gates(form):
    gen = torch.Generator().manual_seed(3)
    compare(gates_for(form, 1e-3, gen, heads=1), length=length_of(form), kv=dims(form), heads=1)


@pytest.mark.parametrize("form", ["scalar", "vector_k", "outer", "full_dt_A"])
def test_packed_sequences(form):
    gen = torch.Generator().manual_seed(4)
    # lengths 5, 0 (empty), then one over a chunk boundary and one shorter than a chunk (the scan
    # kernels' chunk is a block of 16 tokens)
    cu = torch.tensor([0, 5, 5, 26, 44] if form.startswith("full") else [0, 5, 5, 75, 90])
    L = int(cu[-1])
    compare(gates_for(form, 0.3, gen, batch=1, length=L), cu_seqlens=cu, batch=1, length=L, kv=dims(form))


@pytest.mark.parametrize("form", ["vector_k", "full_dt_A"])
def test_without_initial_or_final_state_gradients(form):
    gen = torch.Generator().manual_seed(5)
    compare(gates_for(form, 0.3, gen, heads=1), with_h0=False, with_dht=False, length=length_of(form), kv=dims(form), heads=1)


@pytest.mark.parametrize("form", ["scalar", "vector_k", "outer"])
def test_half_precision_inputs(form):
    gen = torch.Generator().manual_seed(6)
    compare(gates_for(form, 0.3, gen, heads=1), dtype=torch.float16, tol=5e-3, heads=1)


@pytest.mark.parametrize("case", ["packed", "static", "outer"])
def test_the_backward_of_a_decay_along_k(case):
    # the two dq/dk kernels of a K decay (intra then inter), on one head: packed sequences with
    # initial states over a chunk boundary and two K tiles; a static gate; the outer form (the V
    # decay in the inter-chunk matmuls and in dA)
    gen = torch.Generator().manual_seed(11)
    if case == "packed":
        cu = torch.tensor([0, 5, 75, 90])
        kv = (80, 20)  # two K tiles of 64
        g = gates("vector_k", 1, 90, 1, *kv, scale=0.3, gen=gen)
        compare(g, cu_seqlens=cu, batch=1, length=90, kv=kv, heads=1)
    else:
        form = "vector_k_static" if case == "static" else "outer"
        compare(gates_for(form, 0.3, gen, heads=1), heads=1)


def test_strong_decay_over_a_long_sequence_stays_finite_and_exact():
    gen = torch.Generator().manual_seed(7)
    L = 200  # four chunks, the last partial
    g = {"gk": -20.0 * torch.rand(1, L, 1, K, generator=gen)}
    compare(g, batch=1, length=L, with_h0=False, heads=1)


@pytest.mark.parametrize("form", ["full_dt_A", "vector_k"])
def test_inference_forward_matches_the_reference(form):
    # without gradients the kernels skip the saved states: the outputs and final state must not change
    gen = torch.Generator().manual_seed(9)
    (K, V), L, B = dims(form), length_of(form), 2
    gates = gates_for(form, 0.3, gen, batch=B)
    s, e = torch.randn(B, L, H, K, generator=gen), torch.randn(B, L, H, K, generator=gen)
    i, h0 = torch.randn(B, L, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **gates)
    with torch.no_grad():
        dev = {n: x.to(DEVICE) for n, x in gates.items()}
        y, ht = eos_recurrence(s.to(DEVICE), e.to(DEVICE), i.to(DEVICE), h0=h0.to(DEVICE), output_final_state=True,
                               backend="triton", **dev)
    assert rel(y, y_ref) < TOL and rel(ht, ht_ref) < TOL


@pytest.mark.parametrize("form", ["outer", "full_dt_A"])
def test_mixed_input_dtypes_are_promoted(form, monkeypatch):
    # under autocast a parameter-only stage gives fp32 s, e beside bf16 i; the kernels' products
    # need one dtype (Triton refuses fp32 x bf16), so the API promotes and returns y in s's dtype
    from lcsm.kernels.triton import autograd as triton_api

    seen = []
    for name in ("chunk_eos", "scan_eos"):
        real = getattr(triton_api, name)
        monkeypatch.setattr(triton_api, name, lambda q, k, v, *a, _real=real: seen.append((q.dtype, k.dtype, v.dtype)) or _real(q, k, v, *a))
    gen = torch.Generator().manual_seed(10)
    (K, V), L, B = dims(form), length_of(form), 2
    gates = {n: x.to(DEVICE) for n, x in gates_for(form, 0.3, gen, batch=B).items()}
    s, e = torch.randn(B, L, H, K, generator=gen), torch.randn(B, L, H, K, generator=gen)
    i = torch.randn(B, L, H, V, generator=gen).half()
    y, _ = eos_recurrence(s.to(DEVICE), e.to(DEVICE), i.to(DEVICE), backend="triton", **gates)
    y_ref, _ = eos_recurrence(s.double(), e.double(), i.double(), backend="reference", **{n: x.cpu().double() for n, x in gates.items()})
    assert seen == [(torch.float32,) * 3] and y.dtype == torch.float32 and rel(y, y_ref) < TOL


@pytest.mark.parametrize("form", ["scalar", "vector_k_static", "outer", "full_dt_A", "full"])
def test_decode_step_matches_the_recurrence(form):
    gen = torch.Generator().manual_seed(8)
    (K, V), B = dims(form), 2
    gates = gates_for(form, 0.3, gen, batch=B, length=5)
    s, e = torch.randn(B, 5, H, K, generator=gen), torch.randn(B, 5, H, K, generator=gen)
    i = torch.randn(B, 5, H, V, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen)
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **gates)
    for backend in ("triton", "torch"):
        state = h0.clone().to(DEVICE)
        ys = []
        for t in range(5):
            step = {n: (x if x.dim() in (1, 2) or (n == "A" and x.dim() == 3) else x[:, t]).to(DEVICE) for n, x in gates.items()}
            y, state = eos_step(s[:, t].to(DEVICE), e[:, t].to(DEVICE), i[:, t].to(DEVICE), state, backend=backend, **step)
            ys.append(y.cpu())
        assert rel(torch.stack(ys, 1), y_ref) < 1e-5 and rel(state.cpu(), ht_ref) < 1e-5, backend


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 3, 1, 4)
    if not x.is_cuda:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            eos_recurrence(x, x, x, backend="triton")


@pytest.mark.parametrize("packed", [False, True])
def test_the_backward_reuses_the_forward_chunk_states(packed, monkeypatch):
    """One walk over the chunks for the states per forward+backward: the backward reads the states
    the forward kept (it walked them again until 2026-12-02), packed sequences included."""
    from lcsm.kernels.triton import autograd as ag

    walks = []
    real = ag._state_fwd
    monkeypatch.setattr(ag, "_state_fwd", lambda *a: walks.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    B, T = (1, 150) if packed else (2, 100)
    cu = torch.tensor([0, 40, 150]).to(DEVICE) if packed else None
    s, e, i = (torch.randn(B, T, H, D, generator=gen).to(DEVICE).requires_grad_() for D in (K, K, V))
    gk = (-torch.rand(B, T, H, K, generator=gen)).to(DEVICE).requires_grad_()
    y, _ = eos_recurrence(s, e, i, gk=gk, backend="triton", cu_seqlens=cu)
    assert len(walks) == 1
    y.sum().backward()
    assert len(walks) == 1 and all(x.grad is not None for x in (s, e, i, gk))
