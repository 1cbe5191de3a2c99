"""The delta rule m_t = (I - w_t e_tᵀ)(D_t ⊙ m_{t-1}) + e_t i_tᵀ on the CPU: the reference loop
against DeltaNet / Gated DeltaNet / KDA written out directly, the torch chunked (WY / UT) path
against the fp64 loop (outputs, final states, gradients of s, e, i, w, the gates and h0) at gates
of several strengths, β up to 1, lengths that are not multiples of the chunk, packed sequences,
a long sequence at strong decay; the decoding step; Decay's handling of w; and the transition
product for LASP-2."""

import pytest
import torch

from lcsm.kernels import Decay, delta_transition, eos_recurrence, eos_step, recurrence
from lcsm.kernels.testing import DELTA, delta_expand, gates, rel_error, unit_keys

B, T, H, K, V = 2, 37, 3, 5, 6  # T = 37 is not a multiple of any chunk size used
SCALES = {"weak": 1e-3, "moderate": 0.1, "strong": 5.0}
rel = rel_error


def delta_inputs(form, scale, *, beta=(0.5, 1.0), tilt=0.3, dtype=torch.float64, seed=0, batch=B, length=T):
    """s, e, i, h0 and the decay tensors (w included) of a delta form; e = β·(w tilted by `tilt`)."""
    gen = torch.Generator().manual_seed(seed)
    dec = gates(form, batch, length, H, K, V, scale=scale, dtype=dtype, gen=gen)
    e = delta_expand(dec["w"], beta=beta, tilt=tilt, gen=gen)
    s = torch.randn(batch, length, H, K, generator=gen, dtype=dtype)
    i = torch.randn(batch, length, H, V, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, H, K, V, generator=gen, dtype=dtype)
    return s, e, i, h0, dec


def run_with_grads(backend, s, e, i, h0, dec, chunk_size=None, cu_seqlens=None):
    leaves = {"s": s, "e": e, "i": i, "h0": h0, **dec}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y, ht = eos_recurrence(leaves["s"], leaves["e"], leaves["i"], h0=leaves["h0"], output_final_state=True,
                           chunk_size=chunk_size, cu_seqlens=cu_seqlens, backend=backend, **{k: leaves[k] for k in dec})
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    wh = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.dtype)
    ((y * wy).sum() + (ht * wh).sum()).backward()
    return y, ht, {k: v.grad for k, v in leaves.items()}


# --------------------------------------------------------------------------- the reference


def test_the_reference_is_deltanet_gated_deltanet_and_kda():
    # the published recurrences in "delta" order (fla's naive loop, REFERENCES-2 A.5), written out here:
    # S <- D ⊙ S; u = β (v - Sᵀ k); S <- S + k uᵀ; o = Sᵀ q — with w = k, e = β k, i = v, s = q
    gen = torch.Generator().manual_seed(0)
    k = unit_keys(B, T, H, K, dtype=torch.float64, gen=gen)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    gk = -torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    for decay in ({}, {"g": g}, {"gk": gk}):  # DeltaNet, Gated DeltaNet, KDA
        S = torch.zeros(B, H, K, V, dtype=torch.float64)
        o = []
        for t in range(T):
            if "g" in decay:
                S = S * g[:, t].exp()[..., None, None]
            if "gk" in decay:
                S = S * gk[:, t].exp()[..., None]
            u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
            S = S + k[:, t, :, :, None] * u[..., None, :]
            o.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        y, ht = eos_recurrence(q, beta[..., None] * k, v, w=k, output_final_state=True, backend="reference", **decay)
        assert rel(y, torch.stack(o, 1)) < 1e-13 and rel(ht, S) < 1e-13, list(decay)


def test_the_transition_multiplies_the_decayed_state_from_the_left():
    # one step, the general (e not parallel to w) form: m = (I - w eᵀ)(D ⊙ m) + e iᵀ
    gen = torch.Generator().manual_seed(1)
    e, w, s = (torch.randn(1, 1, 1, K, generator=gen, dtype=torch.float64) for _ in range(3))
    i = torch.randn(1, 1, 1, V, generator=gen, dtype=torch.float64)
    gk = -torch.rand(1, 1, 1, K, generator=gen, dtype=torch.float64)
    m0 = torch.randn(1, 1, K, V, generator=gen, dtype=torch.float64)
    _, m = eos_recurrence(s, e, i, w=w, gk=gk, h0=m0, output_final_state=True, backend="reference")
    O = (torch.eye(K, dtype=torch.float64) - w[0, 0, 0][:, None] * e[0, 0, 0][None, :]) @ torch.diag(gk[0, 0, 0].exp())
    assert torch.allclose(m[0, 0], O @ m0[0, 0] + e[0, 0, 0][:, None] * i[0, 0, 0][None, :], atol=1e-13)


# --------------------------------------------------------------------------- the torch chunked path


@pytest.mark.parametrize("strength", list(SCALES))
@pytest.mark.parametrize("form", DELTA)
def test_torch_delta_matches_reference(form, strength):
    s, e, i, h0, dec = delta_inputs(form, SCALES[strength])
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, h0, dec)
    for chunk_size in (8, None):  # 8: several chunks and a partial one; None: the default (64 or 16)
        y, ht, grads = run_with_grads("torch", s, e, i, h0, dec, chunk_size=chunk_size)
        assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10, chunk_size
        for name, g in g_ref.items():
            assert rel(grads[name], g) < 1e-9, f"d{name} (chunk {chunk_size})"


@pytest.mark.parametrize("form", ["delta", "delta_scalar", "delta_vector_k"])
def test_torch_delta_at_beta_one(form):
    # the hard case: e = w exactly (β = 1), the transition I - k̂ k̂ᵀ is a projection (singular)
    s, e, i, h0, dec = delta_inputs(form, 0.1, beta=(1.0, 1.0), tilt=0.0)
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, h0, dec)
    y, ht, grads = run_with_grads("torch", s, e, i, h0, dec, chunk_size=16)
    assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10
    for name, g in g_ref.items():
        assert torch.isfinite(grads[name]).all() and rel(grads[name], g) < 1e-9, name


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_fp32_inputs_within_design_tolerance(form):
    s, e, i, h0, dec = delta_inputs(form, 0.1, dtype=torch.float32)
    y, ht = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="torch", **dec)
    y_ref, ht_ref = eos_recurrence(s.double(), e.double(), i.double(), h0=h0.double(), output_final_state=True,
                                   backend="reference", **{k: v.double() for k, v in dec.items()})
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    assert rel(y, y_ref) < 1e-5 and rel(ht, ht_ref) < 1e-5


@pytest.mark.parametrize("form", ["delta", "delta_scalar", "delta_vector_k"])
def test_long_sequence_at_strong_decay_and_beta_one_stays_finite_and_exact(form):
    # T = 2048 in fp32, gates up to -20 per step, β = 1: no NaN or inf anywhere, gradients included
    L, Hs, Ks = 2048, 1, 4
    gen = torch.Generator().manual_seed(3)
    w = unit_keys(1, L, Hs, Ks, gen=gen)
    dec = {"w": w}
    if form == "delta_scalar":
        dec["g"] = -20.0 * torch.rand(1, L, Hs, generator=gen)
    elif form == "delta_vector_k":
        dec["gk"] = -20.0 * torch.rand(1, L, Hs, Ks, generator=gen)
    leaves = {"s": torch.randn(1, L, Hs, Ks, generator=gen), "e": w.clone(), "i": torch.randn(1, L, Hs, Ks, generator=gen), **dec}
    out = {}
    for backend, dtype in (("reference", torch.float64), ("torch", torch.float32)):
        x = {n: t.to(dtype).clone().requires_grad_() for n, t in leaves.items()}
        y, ht = eos_recurrence(x["s"], x["e"], x["i"], output_final_state=True, backend=backend, chunk_size=64 if backend == "torch" else None,
                               **{n: x[n] for n in dec})
        (y.sum() + ht.sum()).backward()
        out[backend] = (y, ht, {n: t.grad for n, t in x.items()})
    y, ht, grads = out["torch"]
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert rel(y, out["reference"][0]) < 1e-4 and rel(ht, out["reference"][1]) < 1e-4
    for n in grads:
        assert rel(grads[n], out["reference"][2][n]) < 1e-4, n


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k_static"])
def test_packed_sequences(form):
    s, e, i, _, dec = delta_inputs(form, 0.3, batch=1)
    cu = torch.tensor([0, 9, 9, 30, T])  # an empty sequence included
    h0 = torch.randn(4, H, K, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, h0, dec, cu_seqlens=cu)
    y, ht, grads = run_with_grads("torch", s, e, i, h0, dec, cu_seqlens=cu, chunk_size=4)
    assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 1e-9, name
    # the third sequence alone, from its own initial state
    part = Decay(**dec).slice(9, 30).tensors()
    y_seg, _ = eos_recurrence(s[:, 9:30], e[:, 9:30], i[:, 9:30], h0=h0[2:3], backend="reference", **part)
    assert rel(y[:, 9:30], y_seg) < 1e-10


# --------------------------------------------------------------------------- Decay and the API


def test_w_composes_with_g_and_gk_only():
    s, e, i, _, dec = delta_inputs("delta", 0.1)
    for name, x in (("gv", torch.zeros(B, T, H, V)), ("A", -torch.ones(H, K, V))):
        with pytest.raises(ValueError, match=f"composes with the decays 'g' and 'gk' only.*'{name}'"):
            eos_recurrence(s, e, i, w=dec["w"], **{name: x})
    with pytest.raises(ValueError, match="'w' has shape"):
        eos_recurrence(s, e, i, w=dec["w"][..., :-1])
    with pytest.raises(ValueError, match="composes with"):
        eos_step(s[:, 0], e[:, 0], i[:, 0], torch.zeros(B, H, K, V), w=dec["w"][:, 0], gv=torch.zeros(B, H, V))
    with pytest.raises(ValueError, match="delta_transition"):
        Decay(w=dec["w"]).total(B, T, (H, K, V), torch.float64, "cpu")
    with pytest.raises(ValueError, match="no removal key"):
        delta_transition(e, Decay(g=torch.zeros(B, T, H)))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_masked_tokens_leave_the_memory_as_it_was(backend):
    # Mixture-of-Memories: an unchosen memory has o = 1 and w = 0 (Decay.masked) and e = 0
    s, e, i, h0, dec = delta_inputs("delta_scalar", 0.3, batch=1)
    keep = torch.ones(1, T, H, dtype=torch.bool)
    keep[:, 10:20] = False
    masked = Decay(**dec).masked(keep)
    y, ht = recurrence(s, e * keep[..., None], i, masked, h0=h0, output_final_state=True, backend=backend)
    idx = torch.cat([torch.arange(10), torch.arange(20, T)])
    y_ref, ht_ref = eos_recurrence(s[:, idx], e[:, idx], i[:, idx], h0=h0, output_final_state=True, backend="reference",
                                   **{n: x[:, idx] for n, x in dec.items()})
    assert rel(ht, ht_ref) < 1e-10 and rel(y[:, idx], y_ref) < 1e-10


@pytest.mark.parametrize("form", ["delta", "delta_scalar", "delta_vector_k_static"])
def test_decode_step_matches_the_recurrence(form):
    s, e, i, h0, dec = delta_inputs(form, 0.3, dtype=torch.float32, length=5)
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **dec)
    state, ys = h0.clone(), []
    for t in range(5):
        y, state = eos_step(s[:, t], e[:, t], i[:, t], state, backend="torch", **Decay(**dec).at(t).tensors())
        ys.append(y)
    assert rel(torch.stack(ys, 1), y_ref) < 1e-5 and rel(state, ht_ref) < 1e-5


# --------------------------------------------------------------------------- LASP-2: the transition product


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("form", ["delta", "delta_scalar", "delta_vector_k"])
def test_transition_product_is_the_slice_map(form, backend):
    # m_end = P m_start + S: P applied to m0 plus the zero-state final state is the final state from h0 = m0
    s, e, i, m0, dec = delta_inputs(form, 0.3)
    decay = Decay(**dec)
    P = delta_transition(e, decay, backend=backend, chunk_size=8 if backend == "torch" else None)
    assert P.shape == (B, H, K, K) and P.dtype == torch.float64
    _, S = recurrence(s, e, i, decay, output_final_state=True, backend=backend)
    _, full = recurrence(s, e, i, decay, h0=m0, output_final_state=True, backend="reference")
    assert rel(P @ m0 + S, full) < 1e-10
    # orientation: the product of (I - w_t e_tᵀ) D_t with the latest token on the left
    log_d = decay.along_k(B, T, torch.float64)
    Pt = torch.eye(K, dtype=torch.float64).expand(B, H, K, K)
    for t in range(T):
        D = torch.ones(B, H, K, dtype=torch.float64) if log_d is None else torch.exp(log_d[:, t]).expand(B, H, K)
        O = torch.eye(K, dtype=torch.float64) - dec["w"][:, t, :, :, None] * e[:, t, :, None, :]
        Pt = (O * D[..., None, :]) @ Pt
    assert rel(P, Pt) < 1e-10


def test_transition_product_is_differentiable_and_packs_sequences():
    gen = torch.Generator().manual_seed(4)
    w = unit_keys(1, 6, 1, 3, dtype=torch.float64, gen=gen)
    e = delta_expand(w, beta=(0.5, 1.0), tilt=0.3, gen=gen)
    g = -torch.rand(1, 6, 1, dtype=torch.float64, generator=gen)

    def P_of(e, w, g):
        return delta_transition(e, Decay(w=w, g=g), backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(P_of, (e.requires_grad_(), w.requires_grad_(), g.requires_grad_()))
    cu = torch.tensor([0, 2, 6])
    P = delta_transition(e.detach(), Decay(w=w.detach(), g=g.detach()), cu_seqlens=cu, backend="torch")
    for n, (a, b) in enumerate([(0, 2), (2, 6)]):
        part = P_of(e.detach()[:, a:b], w.detach()[:, a:b], g.detach()[:, a:b])
        assert rel(P[n : n + 1], part) < 1e-12


@pytest.mark.parametrize("form", ["delta_scalar", "delta_vector_k"])
def test_a_log_decay_of_minus_inf_resets_the_memory(form):
    # o = 0 at a few tokens (inside a chunk, at chunk edges, the last): the state becomes e iᵀ alone
    s, e, i, h0, dec = delta_inputs(form, 0.3)
    name = "g" if form == "delta_scalar" else "gk"
    dec[name][:, [0, 7, 8, 36]] = float("-inf")
    y_ref, ht_ref, g_ref = run_with_grads("reference", s, e, i, h0, dec)
    y, ht, grads = run_with_grads("torch", s, e, i, h0, dec, chunk_size=8)
    assert torch.allclose(ht_ref, e[:, -1, :, :, None] * i[:, -1, :, None, :])
    assert rel(y, y_ref) < 1e-9 and rel(ht, ht_ref) < 1e-9
    for k in g_ref:
        assert torch.isfinite(grads[k]).all() and rel(grads[k], g_ref[k]) < 1e-6, k


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_beta_is_the_write_key_scaled_on_every_path(backend):
    # eos_recurrence(s, w, i, w=w, beta=β) is the recurrence with e = β w: the whole sequence, the
    # decoding step and the transition product, with β's gradient
    s, _, i, h0, dec = delta_inputs("delta_scalar", 0.3, seed=21)
    w = dec["w"]
    beta = torch.rand(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(22)).requires_grad_()
    y, ht = eos_recurrence(s, w, i, h0=h0, output_final_state=True, beta=beta, backend=backend, **dec)
    e = w * beta[..., None]
    y_ref, ht_ref = eos_recurrence(s, e, i, h0=h0, output_final_state=True, backend="reference", **dec)
    assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10
    (g1,) = torch.autograd.grad(y.sum(), beta)
    (g2,) = torch.autograd.grad(y_ref.sum(), beta)
    assert rel(g1, g2) < 1e-10
    state = h0.clone()
    for t in range(3):
        one = Decay(**dec, beta=beta.detach()).at(t)
        y_t, state = eos_step(s[:, t], w[:, t], i[:, t], state, backend=backend, **one.tensors())
        assert rel(y_t, y_ref[:, t]) < 1e-6  # the decoding state is fp32
    P = delta_transition(w, Decay(**dec, beta=beta.detach()), backend=backend)
    assert rel(P, delta_transition(e.detach(), Decay(**dec), backend=backend)) < 1e-10


def test_beta_of_the_wrong_shape_is_refused_by_name():
    s, e, i, _, dec = delta_inputs("delta", 0.3)
    with pytest.raises(ValueError, match=r"'beta' has shape \(2, 37\); expected \[B,T,H\] = \[2, 37, 3\] per token or \[H\]"):
        eos_recurrence(s, e, i, beta=torch.ones(B, T), backend="torch", **dec)
    with pytest.raises(ValueError, match="transition: fold beta into e first"):
        Decay(**dec, beta=torch.ones(B, T, H)).transition(torch.zeros(B, H, K, V, dtype=torch.float64), 0, e[:, 0])


def run_keyed_with_grads(backend, s, i, h0, dec, beta, chunk_size=None):
    """eos_recurrence(s, w, i, w=w, beta=β) (fla's form: the key passed as both e and w) with the
    gradients of s, w, i, h0, β and the gates."""
    leaves = {"s": s, "i": i, "h0": h0, "beta": beta, **dec}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y, ht = eos_recurrence(leaves["s"], leaves["w"], leaves["i"], h0=leaves["h0"], output_final_state=True,
                           chunk_size=chunk_size, backend=backend, **{k: leaves[k] for k in [*dec, "beta"]})
    gen = torch.Generator().manual_seed(1)
    wy, wh = torch.randn(y.shape, generator=gen, dtype=y.dtype), torch.randn(ht.shape, generator=gen, dtype=ht.dtype)
    ((y * wy).sum() + (ht * wh).sum()).backward()
    return y, ht, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("form", DELTA)
@pytest.mark.parametrize("beta_range", [(0.0, 1.0), (1.0, 1.0)])
def test_torch_path_in_fla_form_matches_reference(form, beta_range):
    # the torch path's own form for beta with w = e, at β up to 1 (a projection: the singular case)
    s, _, i, h0, dec = delta_inputs(form, 0.3, seed=23)
    lo, hi = beta_range
    beta = lo + (hi - lo) * torch.rand(B, T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    y_ref, ht_ref, g_ref = run_keyed_with_grads("reference", s, i, h0, dec, beta)
    for chunk_size in (8, None):
        y, ht, grads = run_keyed_with_grads("torch", s, i, h0, dec, beta, chunk_size=chunk_size)
        assert rel(y, y_ref) < 1e-10 and rel(ht, ht_ref) < 1e-10, chunk_size
        for name, g in g_ref.items():
            assert rel(grads[name], g) < 1e-9, f"d{name} (chunk {chunk_size})"
