"""The MoE channel mixer equals a per-token reference loop (outputs and gradients), drops past
capacity only when asked, and leaves its load-balancing loss for Model.aux_loss()."""

import pytest
import torch
import torch.nn.functional as F

from lcsm.nn.model import Model
from lcsm.config.spec import SpecError, load_model_spec

SPEC = {"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 32, "mixer": {"kind": "eos", "oscillation": {"kind": "ones"}}}


def moe_model(**moe):
    return Model.from_spec(SPEC | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 2, **moe}}).double()


def reference(moe, x):
    """The definition, one token and one chosen expert at a time."""
    x2 = x.reshape(-1, x.shape[-1])
    probs = F.softmax(x2 @ moe.router.weight.T, dim=-1)
    out = []
    for n in range(x2.shape[0]):
        w, idx = torch.topk(probs[n], moe.k)
        w = w / w.sum() if moe.k > 1 else w
        y = 0
        for wj, e in zip(w, idx):
            h = F.silu(x2[n] @ moe.w_gate[e]) * (x2[n] @ moe.w_up[e])
            y = y + wj * (h @ moe.w_down[e])
        if moe.shared is not None:
            y = y + moe.shared(x2[n])
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("shared", [False, True])
def test_moe_matches_reference_loop(shared):
    torch.manual_seed(0)
    moe = moe_model(shared_expert=shared).blocks[0].channel_mixer
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 16, dtype=torch.float64)
    y = moe(x)
    grads = torch.autograd.grad((y * dy).sum(), [x] + list(moe.parameters()))
    y_ref = reference(moe, x)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [x] + list(moe.parameters()))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_load_balancing_loss_and_capacity():
    torch.manual_seed(0)
    model = moe_model(aux_loss_weight=0.1)
    tokens = torch.randint(0, 32, (2, 9))
    model(tokens)
    moe = model.blocks[0].channel_mixer
    assert torch.is_tensor(model.aux_loss()) and float(model.aux_loss().detach()) > 0
    # Switch: α·E·Σ f_e P_e is α when routing is uniform; any imbalance only raises it
    assert float(0.1 * moe.routing_stats.loss().detach()) >= 0.1 * 0.999
    assert "blocks.0.channel_mixer.max_load" in model.aux_stats()
    # a tiny capacity drops slots (and says how many); dropless never does
    capped = moe_model(capacity_factor=0.25)
    capped.load_state_dict(model.state_dict())
    capped(tokens)
    stats = capped.aux_stats()
    assert stats["blocks.0.channel_mixer.dropped"] > 0.5
    assert not torch.allclose(capped(tokens), model(tokens))


def test_moe_spec_errors():
    with pytest.raises(SpecError, match="top_k = 5 must be at most experts = 4"):
        load_model_spec(SPEC | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 5}})
    with pytest.raises(SpecError, match="experts"):
        load_model_spec(SPEC | {"channel_mixer": {"kind": "moe", "experts": 1}})


def test_moe_model_trains_and_logs_its_load(tmp_path, monkeypatch):
    import json

    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train
    from helpers import tiny

    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))
    data = tiny(tmp_path, steps=2, eval_every=2)
    data["model"]["channel_mixer"] = {"kind": "moe", "experts": 4, "top_k": 2}
    train(load_recipe(data), quiet=True)
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [l for l in lines if l["split"] == "train"]
    assert all(l["aux_loss"] > 0 and "blocks.1.channel_mixer.max_load" in l for l in train_lines)


@pytest.mark.parametrize("kind", ["moe", "mom"])
def test_a_single_choice_keeps_the_router_learning(kind):
    # top_k = 1: a renormalised weight would always be 1 and the router would get no gradient from the loss
    if kind == "moe":
        model = Model.from_spec(SPEC | {"channel_mixer": {"kind": "moe", "experts": 4, "top_k": 1, "aux_loss_weight": 0.0}}).double()
        router = model.blocks[0].channel_mixer.router.weight
    else:
        data = SPEC | {"mixer": {"kind": "eos", "oscillation": {"kind": "scalar", "source": "data"},
                                 "routing": {"memories": 3, "top_k": 1, "aux_loss_weight": 0.0}}}
        model = Model.from_spec(data).double()
        router = model.blocks[0].mixer.router.proj.weight
    model(torch.randint(0, 32, (2, 12))).square().mean().backward()
    assert router.grad is not None and router.grad.abs().max() > 1e-6
