"""The fused functions of the model path (lcsm/nn/fused.py) equal the plain torch expressions,
outputs and every gradient, in fp64 and in bf16 within bf16 rounding; the model's loss over every
row (as on the GPU) equals its loss over the labelled rows (as on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from lcsm.nn.fused import gated_rms_norm, swiglu


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
