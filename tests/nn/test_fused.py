"""The fused functions of the model path (lcsm/nn/fused.py) equal the plain torch expressions,
outputs and every gradient, in fp64 and in bf16 within bf16 rounding; the model's loss over every
row (as on the GPU) equals its loss over the labelled rows (as on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from lcsm.nn.fused import (ACTS, act_linear, bounded_sigmoid_log, gated_norm, gated_norm_linear, gated_rms_norm,
                           one_minus_exp, sigmoid_log, swiglu)


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct tensors autograd keeps for fn(*args)'s backward (parameters included)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_swiglu_equals_silu_times():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (a, b))
    torch.testing.assert_close(swiglu(a, b), F.silu(a) * b)


@pytest.mark.parametrize("act", ["silu", "sigmoid"])
@pytest.mark.parametrize("gate_first", [False, True])
def test_gated_rms_norm_equals_the_plain_expression(act, gate_first):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_()
    f = F.silu if act == "silu" else torch.sigmoid

    def plain(y, w, g):
        x = y * f(g) if gate_first else y
        out = F.rms_norm(x, (8,), w, 1e-5)
        return out if gate_first else out * f(g)

    torch.testing.assert_close(gated_rms_norm(y, w, g, 1e-5, act, gate_first), plain(y, w, g))
    assert torch.autograd.gradcheck(lambda y, w, g: gated_rms_norm(y, w, g, 1e-5, act, gate_first), (y, w, g))
    # bf16 inputs: computed in fp32 inside, returned in bf16
    yb, gb = y.detach().bfloat16(), g.detach().bfloat16()
    out = gated_rms_norm(yb, w.detach().float(), gb, 1e-5, act, gate_first)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), plain(yb.double(), w.detach(), gb.double()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu", "identity"])
@pytest.mark.parametrize("gated", [True, False])
def test_act_linear_equals_the_plain_expression_and_keeps_less(act, gated):
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    f = ACTS[act][0]
    bb = b if gated else None

    def plain(a, b, w):
        return F.linear(f(a) * b if b is not None else f(a), w)

    torch.testing.assert_close(act_linear(a, bb, w, act), plain(a, bb, w))
    if act != "relu":  # relu's kink makes finite differences unreliable at random points
        assert torch.autograd.gradcheck(lambda a, b, w: act_linear(a, b, w, act), (a, bb, w))
    else:
        out, ref = act_linear(a, bb, w, act), plain(a, bb, w)
        g = torch.randn_like(out)
        for x, y in zip(torch.autograd.grad(out, [a, w], g), torch.autograd.grad(ref, [a, w], g)):
            torch.testing.assert_close(x, y)
    # act(a) ⊙ b (or act(a)) is recomputed, not kept: one [2, 5, 12] tensor fewer, except where the
    # plain expression keeps nothing beyond a anyway (relu keeps only its output, identity nothing)
    fused_bytes, plain_bytes = saved_bytes(act_linear, a, bb, w, act), saved_bytes(plain, a, bb, w)
    assert fused_bytes < plain_bytes if gated or act in ("silu", "gelu") else fused_bytes <= plain_bytes
    # bf16: the same rounding as the plain bf16 expression
    ab, bh, wb = a.detach().bfloat16(), b.detach().bfloat16(), w.detach().bfloat16()
    out = act_linear(ab, bh if gated else None, wb, act)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), plain(ab.double(), bh.double() if gated else None, wb.double()),
                               rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("gate_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_layer_norm_equals_the_plain_expression(gate_first, bias):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(8, generator=gen, dtype=torch.float64)).requires_grad_() if bias else None

    def plain(y, w, g, b):
        x = y * F.silu(g) if gate_first else y
        out = F.layer_norm(x, (8,), w, b, 1e-5)
        return out if gate_first else out * F.silu(g)

    def fused(y, w, g, b):
        return gated_norm(y, w, g, 1e-5, "silu", gate_first, bias=b, layer=True)

    torch.testing.assert_close(fused(y, w, g, b), plain(y, w, g, b))
    assert torch.autograd.gradcheck(fused, (y, w, g, b))
    assert saved_bytes(fused, y, w, g, b) < saved_bytes(plain, y, w, g, b)


@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("gate_first", [False, True, None])  # None: no gate
@pytest.mark.parametrize("heads", [True, False])
def test_gated_norm_linear_equals_norm_then_projection_and_keeps_less(layer, gate_first, heads):
    gen = torch.Generator().manual_seed(6)
    shape = (2, 5, 3, 4) if heads else (2, 5, 12)  # per head ([B,T,H,V], norm over V) or over all of H·V
    y, g = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if gate_first is None:
        g, gate_first = None, False
    D = shape[-1]
    w = (1 + 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(D, generator=gen, dtype=torch.float64)).requires_grad_() if layer else None
    proj = torch.randn(7, 12, generator=gen, dtype=torch.float64, requires_grad=True)

    def fused(y, w, g, proj, b):
        return gated_norm_linear(y, w, g, proj, 1e-5, "sigmoid", gate_first, bias=b, layer=layer)

    def plain(y, w, g, proj, b):
        return F.linear(gated_norm(y, w, g, 1e-5, "sigmoid", gate_first, bias=b, layer=layer).flatten(2), proj)

    out = fused(y, w, g, proj, b)
    assert out.shape == (2, 5, 7)
    torch.testing.assert_close(out, plain(y, w, g, proj, b))
    assert torch.autograd.gradcheck(fused, (y, w, g, proj, b))
    assert saved_bytes(fused, y, w, g, proj, b) < saved_bytes(plain, y, w, g, proj, b)
    if g is None:  # the norm alone is torch's norm
        norm = F.layer_norm(y, (D,), w, b, 1e-5) if layer else F.rms_norm(y, (D,), w, 1e-5)
        torch.testing.assert_close(gated_norm(y, w, None, 1e-5, bias=b, layer=layer), norm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sigmoid_log_equals_logsigmoid_over_tau_and_keeps_z_in_its_dtype(dtype):
    gen = torch.Generator().manual_seed(4)
    z = (4 * torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    out = sigmoid_log(z, 16.0)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = F.logsigmoid(z.detach().double().requires_grad_()) / 16.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda z: sigmoid_log(z, 16.0), (z,))
    else:  # keeps the bf16 z (2 bytes per element), not an fp32 copy
        assert saved_bytes(lambda z: sigmoid_log(z, 16.0), z) == z.numel() * 2


def test_bounded_sigmoid_log_and_its_bound_gradient():
    gen = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    bound = torch.rand(3, 4, generator=gen, dtype=torch.float64).mul(0.9).requires_grad_()

    def plain(z, b):
        return torch.log(b + (1 - b) * torch.sigmoid(z))

    torch.testing.assert_close(bounded_sigmoid_log(z, bound), plain(z, bound))
    assert torch.autograd.gradcheck(bounded_sigmoid_log, (z, bound))
    assert torch.autograd.gradcheck(lambda z: bounded_sigmoid_log(z, 0.25), (z,))
    assert saved_bytes(bounded_sigmoid_log, z, bound) < saved_bytes(plain, z, bound)


def test_one_minus_exp():
    log_o = -torch.rand(2, 5, 3, dtype=torch.float64).mul(3).requires_grad_()
    torch.testing.assert_close(one_minus_exp(log_o, torch.float64), -torch.expm1(log_o))
    assert torch.autograd.gradcheck(lambda x: one_minus_exp(x, torch.float64), (log_o,))
    assert one_minus_exp(log_o.float(), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_loss_over_every_row_equals_the_loss_over_the_labelled_rows(reduction, monkeypatch):
    # on the GPU the loss runs over every position with the unlabelled ones ignored (no wait for
    # the count of labelled rows); on the CPU over the labelled rows only: the same loss and gradients
    import lcsm.nn.model as model_module
    from lcsm.config.spec import load_model_spec
    from lcsm.nn.model import Model

    torch.manual_seed(0)
    spec = load_model_spec("gla").model_copy(update={"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64})
    model = Model(spec)
    tokens = torch.randint(0, 64, (2, 24))
    labels = torch.randint(0, 64, (2, 24))
    labels[:, ::3] = -100  # MQAR-like: some positions carry no label

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens, labels, reduction=reduction)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    selected, grads_selected = loss_and_grads()
    monkeypatch.setattr(model_module, "SELECT_LABELLED_ON", ())
    every, grads_every = loss_and_grads()
    torch.testing.assert_close(every, selected)
    for a, b in zip(grads_every, grads_selected):
        torch.testing.assert_close(a, b)
