"""The delta-rule Triton kernels (under the interpreter on the CPU) against the fp64 reference loop:
outputs, final states and the gradients of s, e, i, w, the gates and h0, for every delta form
(no decay, scalar, along K, static or per token), gates from -1e-3 to -5 per step, β up to 1 (e = w
exactly, the singular case), e not parallel to w, initial states, packed sequences, lengths that
are not multiples of the chunk, several K and V tiles, no NaN at strong decay over several
chunks; the decode step and the transition product.

bf16 is not checked here: the interpreter's bf16 matrix products are wrong (Triton 3.6 and 3.9);
the GPU run of `lcsm bench kernels --check` covers it."""

import os

import pytest
import torch

from lcsm.kernels import Decay, delta_transition, eos_recurrence, eos_step, recurrence
from lcsm.kernels.testing import DELTA, delta_expand, gates, rel_error

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the interpreter"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, K, V = 1, 70, 2, 12, 20  # two chunks of 64, the second with 6 tokens
# The interpreter runs a grid's programs one after another (time goes with batch × heads × length):
# every form at moderate gates, packed sequences and the layouts with two heads, the numerical
# regimes (weak and strong gates, -inf gates, strong decay over several chunks, no initial or final
# state) with one.
TOL = 1e-4 if DEVICE == "cpu" else 5e-3  # fp32 against fp64; GPU fp32 products use tf32 (docs/kernels.md)
rel = rel_error


def compare(form, scale, *, beta=(0.5, 1.0), tilt=0.3, dtype=torch.float32, tol=TOL, cu_seqlens=None, batch=B,
            length=T, kv=(K, V), seed=0, with_h0=True, with_dht=True, decay=None, heads=H, keyed=False):
    """Ours (triton) against the reference in fp64, forward and every gradient. keyed: fla's form,
    eos_recurrence(s, w, i, w=w, beta=β) (the key passed as both e and w, β uniform in `beta`
    [B,T,H] and differentiated), which the kernels run without forming β·w."""
    Kd, Vd, H = *kv, heads
    gen = torch.Generator().manual_seed(seed)
    N = batch if cu_seqlens is None else len(cu_seqlens) - 1
    dec = decay if decay is not None else gates(form, batch, length, H, Kd, Vd, scale=scale, gen=gen)
    leaves = {
        "s": torch.randn(batch, length, H, Kd, generator=gen),
        "e": delta_expand(dec["w"], beta=beta, tilt=tilt, gen=gen),
        "i": torch.randn(batch, length, H, Vd, generator=gen),
        **dec,
    }
    if keyed:
        del leaves["e"]
        leaves["beta"] = beta[0] + (beta[1] - beta[0]) * torch.rand(batch, length, H, generator=gen)
    if with_h0:
        leaves["h0"] = torch.randn(N, H, Kd, Vd, generator=gen)
    ours = {n: x.to(DEVICE, dtype if n in "seiw" else torch.float32).clone().requires_grad_() for n, x in leaves.items()}
    ref = {n: x.double().clone().requires_grad_() for n, x in leaves.items()}
    cu_ours = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    names = [*dec, "beta"] if keyed else list(dec)
    args = lambda L, cu: dict(h0=L.get("h0"), output_final_state=True, cu_seqlens=cu, **{n: L[n] for n in names})  # noqa: E731
    e_of = lambda L: L["w"] if keyed else L["e"]  # noqa: E731
    y, ht = eos_recurrence(ours["s"], e_of(ours), ours["i"], backend="triton", **args(ours, cu_ours))
    y_ref, ht_ref = eos_recurrence(ref["s"], e_of(ref), ref["i"], backend="reference", **args(ref, cu_seqlens))
    assert y.dtype == dtype and ht.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    wy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    wh = torch.randn(ht_ref.shape, generator=gen, dtype=torch.float64) * with_dht
    ((y.double().cpu() * wy).sum() + (ht.double().cpu() * wh).sum()).backward()
    ((y_ref * wy).sum() + (ht_ref * wh).sum()).backward()
    errors = {"y": rel(y, y_ref), "ht": rel(ht, ht_ref)}
    errors.update({f"d{n}": rel(ours[n].grad, ref[n].grad) for n in leaves})
    for n in leaves:
        assert torch.isfinite(ours[n].grad).all(), f"d{n} not finite"
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("form", DELTA)
def test_moderate_gates(form):
    compare(form, 0.1)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_scalar_static", "delta_vector_k"])
def test_strong_gates(form):
    compare(form, 5.0, seed=1, heads=1)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_weak_gates(form):
    compare(form, 1e-3, seed=2, heads=1)


@pytest.mark.parametrize("form", DELTA)
def test_keyed_form_moderate_gates(form):
    # fla's form (w = e, β given): its own forward kernels, the general backward through β·w
    compare(form, 0.1, keyed=True, seed=13)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_keyed_form_strong_and_weak_gates_beta_one_packed(form):
    compare(form, 5.0, keyed=True, beta=(0.9, 1.0), seed=14, heads=1)
    compare(form, 1e-3, keyed=True, beta=(1.0, 1.0), seed=15, heads=1)
    cu = torch.tensor([0, 5, 5, 75, 90])
    compare(form, 0.3, keyed=True, cu_seqlens=cu, length=90, seed=16, heads=1)


def test_keyed_form_several_tiles_and_a_static_beta():
    compare("delta_scalar", 0.3, keyed=True, kv=(80, 72), seed=17, heads=1)
    gen = torch.Generator().manual_seed(18)
    dec = gates("delta_scalar", 1, T, H, K, V, scale=0.3, gen=gen)
    s, i = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, V, generator=gen)
    beta = torch.tensor([0.3, 0.9], requires_grad=True)  # [H]: one write strength per head
    beta_ref = beta.detach().double().requires_grad_()
    y = eos_recurrence(s.to(DEVICE), dec["w"].to(DEVICE), i.to(DEVICE), w=dec["w"].to(DEVICE), g=dec["g"].to(DEVICE),
                       beta=beta.to(DEVICE), backend="triton")[0]
    w64 = dec["w"].double()
    y_ref = eos_recurrence(s.double(), w64, i.double(), w=w64, g=dec["g"].double(), beta=beta_ref, backend="reference")[0]
    assert rel(y, y_ref) < TOL
    wy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    (y.double().cpu() * wy).sum().backward()
    (y_ref * wy).sum().backward()
    assert beta.grad.shape == (H,) and rel(beta.grad, beta_ref.grad) < TOL


def test_beta_without_a_removal_key_is_refused():
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="'beta'.*needs the removal key 'w'"):
        eos_recurrence(x, x, x, beta=torch.ones(1, 4, 1), backend="torch")


@pytest.mark.parametrize("form", ["delta", "delta_scalar"])
def test_beta_one(form):
    # e = w exactly: I - k̂ k̂ᵀ is a projection, the hard case of the solve
    compare(form, 0.1, beta=(1.0, 1.0), tilt=0.0, seed=3, batch=2)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_packed_sequences(form):
    cu = torch.tensor([0, 5, 5, 75, 90])  # lengths 5, 0 (empty), 70 (over a chunk boundary), 15
    compare(form, 0.3, cu_seqlens=cu, length=90, seed=4)


def test_without_initial_or_final_state_gradients():
    compare("delta_vector_k", 0.3, with_h0=False, with_dht=False, seed=5, heads=1)


def test_several_k_and_v_tiles():
    # K = 80 and V = 72 span two tiles of the 64-wide kernels (and are not powers of two)
    compare("delta_scalar", 0.3, kv=(80, 72), seed=6)


def test_half_precision_inputs():
    compare("delta_scalar", 0.3, dtype=torch.float16, tol=5e-3, seed=7)
    # fla's form rounds the new values Ũ to the input dtype for the state product
    compare("delta_scalar", 0.3, dtype=torch.float16, tol=5e-3, seed=19, keyed=True, heads=1)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_strong_decay_and_beta_one_over_several_chunks_stay_finite_and_exact(form):
    gen = torch.Generator().manual_seed(8)
    L, H = 140, 1  # three chunks, the last partial
    dec = gates("delta", 1, L, H, K, V, gen=gen)
    dec.update({"g": -20.0 * torch.rand(1, L, H, generator=gen)} if form == "delta_scalar"
               else {"gk": -20.0 * torch.rand(1, L, H, K, generator=gen)})
    compare(form, 0.0, beta=(1.0, 1.0), tilt=0.0, length=L, with_h0=False, decay=dec, heads=H)


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_a_log_decay_of_minus_inf_resets_the_memory(form):
    gen = torch.Generator().manual_seed(12)
    dec = gates(form, B, T, 1, K, V, scale=0.3, gen=gen)
    dec["g" if form == "delta_scalar" else "gk"][:, [0, 5, 63, 64, 69]] = float("-inf")
    compare(form, 0.0, decay=dec, tol=2e-4, seed=12, heads=1)


def test_inference_forward_matches_the_reference():
    # without gradients the same kernels run; nothing is kept for a backward
    gen = torch.Generator().manual_seed(9)
    dec = gates("delta_vector_k", 1, T, H, K, V, scale=0.3, gen=gen)
    e = delta_expand(dec["w"], gen=gen)
    s, i, h0 = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, V, generator=gen), torch.randn(1, H, K, V, generator=gen)
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **dec)
    with torch.no_grad():
        y, ht = eos_recurrence(s.to(DEVICE), e.to(DEVICE), i.to(DEVICE), h0=h0.to(DEVICE), output_final_state=True,
                               backend="triton", **{n: x.to(DEVICE) for n, x in dec.items()})
    assert rel(y, y_ref) < TOL and rel(ht, ht_ref) < TOL


@pytest.mark.parametrize("form", ["delta", "delta_scalar", "delta_vector_k_static", "delta_scalar_and_vector_k"])
def test_decode_step_matches_the_recurrence(form):
    gen = torch.Generator().manual_seed(10)
    dec = gates(form, 2, 5, H, K, V, scale=0.3, gen=gen)
    e = delta_expand(dec["w"], tilt=0.3, gen=gen)
    s, i, h0 = torch.randn(2, 5, H, K, generator=gen), torch.randn(2, 5, H, V, generator=gen), torch.randn(2, H, K, V, generator=gen)
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **dec)
    state, ys = h0.clone().to(DEVICE), []
    for t in range(5):
        one = {n: x.to(DEVICE) for n, x in Decay(**dec).at(t).tensors().items()}
        y, state = eos_step(s[:, t].to(DEVICE), e[:, t].to(DEVICE), i[:, t].to(DEVICE), state, backend="triton", **one)
        ys.append(y.cpu())
    assert rel(torch.stack(ys, 1), y_ref) < 1e-5 and rel(state.cpu(), ht_ref) < 1e-5


def test_transition_product_is_the_slice_map():
    gen = torch.Generator().manual_seed(11)
    dec = gates("delta_scalar_and_vector_k", 1, T, H, K, V, scale=0.3, gen=gen)
    e = delta_expand(dec["w"], tilt=0.3, gen=gen)
    s, i, m0 = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, V, generator=gen), torch.randn(1, H, K, V, generator=gen)
    decay = Decay(**{n: x.to(DEVICE) for n, x in dec.items()})
    P = delta_transition(e.to(DEVICE), decay, backend="triton")
    _, S = recurrence(s.to(DEVICE), e.to(DEVICE), i.to(DEVICE), decay, output_final_state=True, backend="triton")
    _, full = eos_recurrence(s, e, i, h0=m0, output_final_state=True, backend="reference", **dec)
    assert P.shape == (1, H, K, K) and rel(P.cpu() @ m0 + S.cpu(), full) < TOL


@pytest.mark.parametrize("prec", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("keyed", [False, True])
def test_solve_in_the_input_dtype(monkeypatch, prec, keyed):
    # LCSM_DELTA_T=input keeps T = (I + A)⁻¹ in the inputs' dtype (fp16 here: the interpreter's
    # bf16 products are wrong) and multiplies W̃ U in it, both forms. The interpreter multiplies
    # exactly whatever input_precision says, so here each precision is only traced and run; what
    # tf32x3 and tf32 cost in accuracy is the GPU check's (docs/benchmarks.md, "The solve in bf16")
    monkeypatch.setenv("LCSM_DELTA_T", "input")
    monkeypatch.setenv("LCSM_DELTA_SOLVE", prec)
    compare("delta_scalar", 0.3, dtype=torch.float16, tol=1e-2, seed=23, keyed=keyed, heads=1)


@pytest.mark.parametrize("var, value", [("LCSM_DELTA_T", "bf16"), ("LCSM_DELTA_SOLVE", "fast")])
def test_a_bad_solve_setting_is_refused_by_name(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    x = torch.randn(1, 8, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match=f"{var}='{value}': allowed are"):
        eos_recurrence(x, x, x, w=x, beta=torch.rand(1, 8, 1, device=DEVICE), backend="triton")
