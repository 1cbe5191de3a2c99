"""Attention experts (head_routing on EOS and attention mixers): the routed read-out against a
hand-written reference, exact equality with the unrouted mixer at top_k = G, decoding through the
cache, the balancing loss, active parameters, and bad specs."""

import pytest
import torch
import torch.nn.functional as F

from lcsm.config.spec import SpecError, load_model_spec
from lcsm.nn.cache import new_cache
from lcsm.nn.mixers import eos
from lcsm.nn.model import Model

D, VOCAB = 24, 40

MIXERS = {
    "eos_gla": {"kind": "eos", "expand_k": 0.5, "expand": {"conv": 2}, "oscillation": {"kind": "vector_k", "rank": 4},
                "shrink": {"scale": "rsqrt_k"}, "output": {"norm": "rmsnorm", "gate": "silu"}},
    "eos_norm_all": {"kind": "eos", "oscillation": {"kind": "scalar"}, "output": {"norm": "layernorm", "norm_scope": "all"}},
    "attention": {"kind": "attention"},
    "mom": {"kind": "eos", "oscillation": {"kind": "scalar"}, "routing": {"memories": 3, "top_k": 2}},
}


def spec(mixer: dict, routing: dict | None, n_layers: int = 2) -> dict:
    m = dict(mixer)
    if routing is not None:
        m["head_routing"] = routing
    return {"d_model": D, "n_layers": n_layers, "n_heads": 4, "vocab_size": VOCAB, "mixer": m, "channel_mixer": {"kind": "glu"}}


def pair(name: str, routing: dict, seed: int = 0):
    """(routed, plain): the same weights, the routed one with a head router (weights N(0, 1))."""
    torch.manual_seed(seed)
    plain = Model.from_spec(spec(MIXERS[name], None)).double()
    routed = Model.from_spec(spec(MIXERS[name], routing)).double()
    missing, unexpected = routed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("head_routing" in k for k in missing)
    with torch.no_grad():
        for block in routed.blocks:
            block.mixer.head_routing.router.proj.weight.normal_(0.0, 1.0)
    return routed, plain


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_routed_readout_matches_a_reference(name, monkeypatch):
    """out = o_proj(Σ_g scale·w_g·y_g) with w the renormalised top-k of softmax(W_r x), y the plain
    mixer's per-head output before its projection."""
    routed, plain = pair(name, {"groups": 2, "top_k": 1, "scale": 1.5})
    x = torch.randn(2, 9, D, dtype=torch.float64)
    mixer, ref_mixer = routed.blocks[0].mixer, plain.blocks[0].mixer
    seen = {}

    def norm_then_projection(y, weight, g, proj, eps, **kw):  # the plain EOS read-out fuses its projection
        seen["y"] = eos.gated_norm(y, weight, g, eps, **kw).flatten(2)
        return F.linear(seen["y"], proj)

    monkeypatch.setattr(eos, "gated_norm_linear", norm_then_projection)
    hook = ref_mixer.o_proj.register_forward_pre_hook(lambda m, a: seen.update(y=a[0]))  # (returns None: inputs kept)
    ref_mixer(x)
    hook.remove()
    y = seen["y"].unflatten(-1, (2, -1))  # [B,T,G,H/G·Dh]
    probs = F.softmax(x @ mixer.head_routing.router.proj.weight.T, dim=-1)
    w, idx = probs.max(-1, keepdim=True)  # top-1 keeps its probability
    weights = torch.zeros_like(probs).scatter(-1, idx, w) * 1.5
    expected = ref_mixer.o_proj((y * weights[..., None]).flatten(-2))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-12)
    # both groups chosen at different tokens: the test exercises the routing, not one constant group
    assert len(idx.unique()) == 2


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_group_on_with_a_uniform_router_is_the_plain_mixer(name):
    routed, plain = pair(name, {"groups": 4, "top_k": 4, "scale": 4.0})
    with torch.no_grad():
        for block in routed.blocks:
            block.mixer.head_routing.router.proj.weight.zero_()
    tokens = torch.randint(VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(routed(tokens), plain(tokens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decoding_through_the_cache_equals_the_full_forward(name):
    """Every head's state keeps being updated, so a group chosen later reads the exact memory."""
    routed, _ = pair(name, {"groups": 2, "top_k": 1})
    routed.eval()
    tokens = torch.randint(VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = routed(tokens)
        cache = new_cache(routed)
        steps = torch.cat([routed(tokens[:, :5], cache=cache)] + [routed(tokens[:, t : t + 1], cache=cache) for t in range(5, 11)], dim=1)
        ids = routed.generate(tokens[0, :4].tolist(), max_new_tokens=6, temperature=0.0)
        # greedy generation through the cache = the argmax of repeated full forward passes
        seq = tokens[0, :4].tolist()
        for _ in range(6):
            seq.append(int(routed(torch.tensor([seq]))[0, -1].argmax()))
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)  # (the cached EOS state is fp32)
    assert ids == seq[4:]


def test_balancing_loss_load_and_active_parameters():
    routed, plain = pair("attention", {"groups": 4, "top_k": 1, "aux_loss_weight": 0.1})
    routed(torch.randint(VOCAB, (2, 8)))
    aux = routed.aux_loss()
    per_layer = [0.1 * b.mixer.head_routing.routing_stats.loss() for b in routed.blocks]  # one Switch loss per layer
    torch.testing.assert_close(aux, sum(per_layer))
    assert float(aux.detach()) > 0
    assert "blocks.0.mixer.head_routing.max_load" in routed.aux_stats()
    q, o = routed.blocks[0].mixer.q_proj.weight.numel(), routed.blocks[0].mixer.o_proj.weight.numel()
    row = routed.summary()[0]
    assert row.parameters - row.active_parameters == (q + o) * 3 // 4
    assert routed.num_parameters() - routed.active_parameters() == 2 * (q + o) * 3 // 4
    assert plain.active_parameters() == plain.num_parameters()
    eos, _ = pair("eos_gla", {"groups": 2, "top_k": 1})
    mixer = eos.blocks[0].mixer
    per_head = mixer.o_proj.weight.numel() + mixer.shrink.proj.proj.weight.numel() + mixer.gate_proj.weight.numel()
    assert eos.summary()[0].parameters - eos.summary()[0].active_parameters == per_head // 2


@pytest.mark.parametrize(
    "routing, message",
    [
        ({"groups": 3, "top_k": 1}, "mixer.head_routing.groups: groups = 3 must divide the mixer's heads = 4"),
        ({"groups": 2, "top_k": 3}, "mixer.head_routing.top_k: top_k = 3 must be at most groups = 2"),
        ({"groups": 1, "top_k": 1}, "mixer.head_routing.groups: groups must be at least 2"),
        ({"groups": 2, "topk": 1}, "mixer.head_routing.topk: unknown key; did you mean 'top_k'?"),
        ({"top_k": 1}, "mixer.head_routing.groups: required field is missing"),
    ],
)
def test_bad_head_routing_is_a_clear_error(routing, message):
    with pytest.raises(SpecError) as e:
        load_model_spec(spec(MIXERS["attention"], routing))
    assert message in str(e.value)
    with pytest.raises(SpecError) as e:
        load_model_spec(spec(MIXERS["eos_gla"], routing))
    assert message in str(e.value)


def test_named_mixers_are_checked_too():
    data = spec(MIXERS["eos_gla"], None) | {"mixers": {"attn": {"kind": "attention", "head_routing": {"groups": 8, "top_k": 2}}},
                                             "pattern": "mixer attn"}
    with pytest.raises(SpecError, match="mixers.attn.head_routing.groups: groups = 8 must divide the mixer's heads = 4"):
        load_model_spec(data)
