"""Mixture-of-Memories (routing on an EOS mixer): dense = sparse = reference for outputs and every
gradient, unchosen memories untouched, the balancing loss, decoding from the cache, bad specs."""

import os

import pytest
import torch
import torch.nn.functional as F

from lcsm.nn.model import Model
from lcsm.config.spec import SpecError, load_model_spec
from lcsm.nn.routing import Routed, load_balancing_loss

B, T, D = 2, 11, 24
PATHS = ("dense", "sparse", "reference")


def spec(osc, **routing):
    return {"d_model": D, "n_layers": 1, "n_heads": 2, "vocab_size": 40,
            "mixer": {"kind": "eos", "oscillation": osc, "routing": {"memories": 3, "top_k": 2, **routing}}}


def mixer_of(data, seed=0):
    torch.manual_seed(seed)
    model = Model.from_spec(data).double()
    with torch.no_grad():  # a router with larger weights: routing that differs from token to token
        model.blocks[0].mixer.router.proj.weight.normal_(0.0, 1.0)
    return model, model.blocks[0].mixer


CASES = {
    "ones": ({"kind": "ones"}, {}),
    "scalar_fixed_static": ({"kind": "scalar", "source": "fixed", "slopes": "retnet"}, {}),
    "scalar_param_static_per_memory": ({"kind": "scalar", "source": "param"}, {"per_memory": ["expand", "input", "oscillation"]}),
    "scalar_data": ({"kind": "scalar", "source": "data", "parametrization": "exp_softplus"}, {"shared": False}),
    "vector_k_data": ({"kind": "vector_k", "source": "data", "rank": 4}, {"per_memory": ["expand", "input", "shrink", "oscillation"]}),
    "vector_v_param": ({"kind": "vector_v", "source": "param"}, {"top_k": 1}),
    "scalar_data_bias_shrink_per_memory": ({"kind": "scalar", "source": "data"}, {"per_memory": ["shrink", "expand"], "bias": True}),
    "outer_data": ({"kind": "outer", "source": "data"}, {"memories": 4, "top_k": 3}),
    # delta memories (fla's form: beta with w = e on the dense and sparse paths, folded in the loop)
    "delta_scalar_data_per_memory": ({"kind": "delta", "decay": {"kind": "scalar", "source": "data"},
                                      "beta": {"source": "data", "map": "sigmoid"}},
                                     {"per_memory": ["expand", "input", "oscillation"]}),
    "delta_vector_k_fixed_beta": ({"kind": "delta", "decay": {"kind": "vector_k", "source": "data"},
                                   "beta": {"source": "fixed", "value": 0.7}}, {"per_memory": ["input"]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_paths_agree_on_outputs_and_every_gradient(case):
    osc, routing = CASES[case]
    data = spec(osc, **{k: v for k, v in routing.items() if k != "bias"})
    data["mixer"]["bias"] = routing.get("bias", False)
    if osc["kind"] == "delta":  # the delta rule's keys are unit vectors (the spec checks it)
        data["mixer"]["expand"] = {"source": "data", "norm": "l2"}
    model, mixer = mixer_of(data)
    x0 = torch.randn(B, T, D, dtype=torch.float64)
    dy = torch.randn(B, T, D, dtype=torch.float64)
    results = {}
    for path in PATHS:
        mixer.path = path
        model.zero_grad()
        x = x0.clone().requires_grad_()
        y = mixer(x)
        (y * dy).sum().backward()
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
        results[path] = (y.detach(), x.grad.clone(), grads)
    y_ref, dx_ref, g_ref = results["reference"]
    assert set(g_ref) == {n for n, _ in mixer.named_parameters()}, "every parameter gets a gradient"
    for path in ("dense", "sparse"):
        y, dx, g = results[path]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11, msg=f"{path}: output")
        torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-11, msg=f"{path}: dx")
        assert set(g) == set(g_ref), f"{path}: gradients of {set(g) ^ set(g_ref)}"
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-11, msg=f"{path}: d {name}")
    # the router learns (through the weights) and every projection receives a gradient
    assert "router.proj.weight" in g_ref and g_ref["router.proj.weight"].abs().sum() > 0


def test_per_memory_stages_have_memory_heads():
    _, mixer = mixer_of(spec({"kind": "vector_k"}, per_memory=["expand", "input", "oscillation"]))
    M, H, K, V = mixer.M, mixer.H, mixer.K, mixer.V
    assert M == 4  # 3 routed + shared
    assert mixer.expand.proj.proj.weight.shape[0] == M * H * K
    assert mixer.input.proj.proj.weight.shape[0] == M * H * V
    assert mixer.shrink.proj.proj.weight.shape[0] == H * K  # shared by default


@pytest.mark.parametrize("path", PATHS)
def test_unchosen_memories_are_left_exactly_as_they_were(path):
    _, mixer = mixer_of(spec({"kind": "vector_k", "source": "data"}))
    mixer.path = path
    x = torch.randn(B, T, D, dtype=torch.float64)
    cache = {}
    with torch.no_grad():
        mixer(x[:, :5], cache=cache)
        unchosen_seen = 0
        for t in range(5, T):
            prev = cache["state"].clone()
            mixer(x[:, t : t + 1], cache=cache)
            index = mixer.router(x[:, t : t + 1]).index[:, 0]  # [B,k]
            chosen = torch.zeros(B, mixer.M, dtype=torch.bool).scatter(1, index, True)
            chosen[:, mixer.E] = True  # the shared memory sees every token
            unchosen_seen += int((~chosen).sum())
            for b in range(B):
                for m in range(mixer.M):
                    same = torch.equal(cache["state"][b, m], prev[b, m])
                    assert same != bool(chosen[b, m]), f"t={t} b={b} memory {m}: chosen={bool(chosen[b, m])}"
    assert unchosen_seen > 0


def test_a_memory_never_chosen_stays_zero():
    _, mixer = mixer_of(spec({"kind": "scalar", "source": "data"}, shared=False))
    with torch.no_grad():  # memory 2 can never win: its router logit is -inf-ish
        mixer.router.proj.weight[2] = 0.0
        mixer.router.proj.weight[:2] = 0.0
    x = torch.randn(B, T, D, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, -1e4], dtype=torch.float64)
    mixer.router.proj.register_forward_hook(lambda mod, inp, out: out + bias)
    for path in PATHS:
        mixer.path = path
        cache = {}
        with torch.no_grad():
            mixer(x, cache=cache)
        assert cache["state"][:, 2].abs().max() == 0, path
        assert cache["state"][:, :2].abs().min() > 0, path


def test_balancing_loss_by_hand():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]], dtype=torch.float64)
    index = torch.tensor([[[0, 1], [1, 2]], [[2, 0], [0, 1]]])
    weights = torch.gather(probs, -1, index)
    routed = Routed(weights=weights / weights.sum(-1, keepdim=True), index=index, probs=probs)
    loss, load = load_balancing_loss(routed, 3)
    # 4 tokens; memory 0 chosen by 3 tokens, 1 by 3, 2 by 2; mean probs (1.5, 1.3, 1.2) / 4
    f = torch.tensor([3, 3, 2], dtype=torch.float64) / 4
    P = torch.tensor([1.5, 1.3, 1.2], dtype=torch.float64) / 4
    assert torch.allclose(loss, 3 * (f * P).sum())
    assert torch.allclose(load, f / 2) and torch.isclose(load.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_model_aux_loss_and_stats():
    model, mixer = mixer_of(spec({"kind": "vector_k"}, aux_loss_weight=0.5))
    tokens = torch.randint(0, 40, (B, T))
    model(tokens)
    x = model.blocks[0].mixer_norm(model.embed(tokens))
    routed = mixer.router(x)
    mask = F.one_hot(routed.index, 3).sum(-2).double()
    expected = 3 * (mask.mean((0, 1)) * routed.probs.mean((0, 1))).sum()
    assert torch.allclose(model.aux_loss(), 0.5 * expected)
    stats = model.aux_stats()
    loads = [stats[f"blocks.0.mixer.load_{m}"] for m in range(3)]
    assert abs(sum(loads) - 1.0) < 1e-9 and abs(stats["blocks.0.mixer.balance"] - float(expected.detach())) < 1e-9
    model.aux_loss().backward()
    assert mixer.router.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
def test_decoding_from_the_cache_equals_the_full_forward(path):
    data = spec({"kind": "vector_k", "source": "data"})
    data["mixer"]["expand"] = {"conv": 3}
    data["mixer"]["input"] = {"conv": 4}
    torch.manual_seed(1)
    model = Model.from_spec(data)  # fp32, as decoding runs
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.router.proj.weight.normal_(0.0, 1.0)
    mixer.path = path
    x = torch.randn(B, T, D)
    with torch.no_grad():
        full = mixer(x)
        cache = {}
        parts = [mixer(x[:, :4], cache=cache)]  # prefill, then one token at a time
        parts += [mixer(x[:, t : t + 1], cache=cache) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache["state"].shape == (B, mixer.M, mixer.H, mixer.K, mixer.V)
    assert cache["x_tail"].shape == (B, 3, D)


BAD = [
    ({"memories": 2, "top_k": 3}, "mixer.routing.top_k", "top_k = 3 must be at most memories = 2"),
    ({"memories": 0, "top_k": 1}, "mixer.routing.memories", "at least 1"),
    ({"top_k": 0}, "mixer.routing.top_k", "at least 1"),
    ({"per_memory": ["expand", "values"]}, "mixer.routing.per_memory", "allowed: input, expand, shrink, oscillation"),
    ({"path": "fast"}, "mixer.routing.path", "allowed: auto, dense, sparse, reference"),
    ({"experts": 4}, "mixer.routing.experts", "unknown key"),
]


@pytest.mark.parametrize("routing,where,words", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_routing_fails_clearly(routing, where, words):
    with pytest.raises(SpecError) as info:
        load_model_spec(spec({"kind": "vector_k"}, **routing))
    msg = str(info.value)
    assert where in msg and words in msg, msg


@pytest.mark.parametrize("osc,extra,where,words", [
    ({"kind": "full"}, {}, "mixer.routing", "routing needs a separable oscillation (ones, scalar, vector_k, vector_v, outer, delta); oscillation.kind is 'full'"),
    ({"kind": "rotation"}, {}, "mixer.routing", "oscillation.kind is 'rotation'"),
    ({"kind": "cumsoftmax"}, {}, "mixer.routing", "oscillation.kind is 'cumsoftmax'"),
    ({"kind": "vector_k"}, {"expand": {"tie": "one_minus_oscillation"}}, "mixer.expand.tie", "not supported with routing"),
    ({"kind": "scalar", "source": "fixed"}, {"per_memory": ["oscillation"]}, "mixer.routing.per_memory", "fixed oscillation"),
])
def test_unsupported_combinations_fail_clearly(osc, extra, where, words):
    data = spec(osc)
    routing = data["mixer"]["routing"]
    for key, value in extra.items():
        (routing if key == "per_memory" else data["mixer"])[key] = value
    with pytest.raises(SpecError) as info:
        load_model_spec(data)
    msg = str(info.value)
    assert where in msg and words in msg, msg


def test_auto_path_rule():
    _, mixer = mixer_of(spec({"kind": "vector_k"}, memories=4, top_k=2))
    assert mixer.choose_path(torch.zeros(8, 4096, 1)) == "dense"  # not CUDA
    mixer.path = "sparse"
    assert mixer.choose_path(torch.zeros(1, 1, 1)) == "sparse"


def test_training_logs_the_aux_loss_and_the_load_of_every_memory(tmp_path, monkeypatch):
    import json

    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train

    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe({
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "channel_mixer": {"kind": "none"},
                  "mixer": {"kind": "eos", "oscillation": {"kind": "vector_k"},
                            "routing": {"memories": 3, "top_k": 2, "aux_loss_scope": "per_layer"}}},
        "task": {"kind": "mqar", "vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}],
                 "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 16}]},
        "batch_size": 16, "steps": 3, "log_every": 1, "out_dir": str(tmp_path / "run"),
    })
    train(recipe, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["split"] == "train"]
    assert len(steps) == 3
    for r in steps:
        for layer in (0, 1):
            loads = [r[f"blocks.{layer}.mixer.load_{m}"] for m in range(3)]
            assert abs(sum(loads) - 1) < 1e-3
            assert 1.5 < r[f"blocks.{layer}.mixer.balance"] < 3.0  # k = 2 when balanced
        # per_layer: the logged aux loss is the weighted balance of both layers (0.01 each)
        assert abs(r["aux_loss"] - 0.01 * (r["blocks.0.mixer.balance"] + r["blocks.1.mixer.balance"])) < 1e-4
    from lcsm.cli.main import main

    assert main(["bench", "mom", "--table", str(tmp_path / "run"), "--json", str(tmp_path / "t.json")]) == 0
    row = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    assert row["memories"] == "3, top-2 + shared" and row["steps"] == 3 and 0 <= row["accuracy"] <= 1
    assert main(["bench", "mom", "--table", str(tmp_path / "missing")]) == 2


def test_bench_mom_runs_small_on_the_cpu(tmp_path, capsys):
    import json

    from lcsm.cli.main import main

    assert main(["bench", "mom", "--small", "--profile", "1", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["single memory", "MoM dense", "MoM sparse"]
    assert all(r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 for r in rows)
    assert all(r["profile"]["ms"] > 0 and r["profile"]["kernels"] for r in rows)  # --profile: per-kernel times
    out = capsys.readouterr().out
    assert "| MoM sparse |" in out and "forward + backward, device time per call" in out and "MoM sparse, longest kernels" in out


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("path,osc", [("dense", "vector_k"), ("sparse", "vector_k"), ("dense", "delta"), ("sparse", "delta")])
def test_triton_kernels_run_both_paths(path, osc):
    """The paths on the Triton kernels (the interpreter on the CPU): packed segments, h0 and ht;
    delta memories in fla's form (beta with w = e, the varlen kernels on the sparse path)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if osc == "delta":
        data = spec({"kind": "delta", "decay": {"kind": "scalar", "source": "data"}, "beta": {"source": "data"}},
                    memories=3, top_k=2, per_memory=["expand", "input", "oscillation"])
        data["mixer"]["expand"] = {"source": "data", "norm": "l2"}
    else:
        data = spec({"kind": "vector_k", "source": "data"}, memories=3, top_k=2)
    model = Model.from_spec(data).to(device)
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.router.proj.weight.normal_(0.0, 1.0)
    # one sequence: the interpreter's time goes with the programs of a grid, batch × memories × heads
    x0 = torch.randn(1, 20, D, device=device)
    h0 = torch.randn(1, mixer.M, mixer.H, mixer.K, mixer.V, device=device)
    out = {}
    for name, backend in (("reference", "torch"), (path, "triton")):
        mixer.path, mixer.backend = name, backend
        model.zero_grad()
        x, state = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        cache = {"state": state}
        y = mixer(x, cache=cache)
        (y.square().sum() + cache["state"].sin().sum()).backward()
        gate = getattr(mixer.oscillation, "inner", mixer.oscillation).gate  # a delta oscillation wraps its decay
        extra = (mixer.oscillation.beta_proj.weight.grad,) if osc == "delta" else ()
        out[name] = (y, cache["state"], x.grad, state.grad, mixer.expand.proj.proj.weight.grad,
                     gate.proj.weight.grad, *extra)
    for a, b in zip(out[path], out["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("path", PATHS)
def test_one_memory_is_the_plain_mixer(path):
    """memories 1, top_k 1, no shared memory: the router's weight is 1 and every token is routed."""
    osc = {"kind": "outer", "source": "data"}
    model, mixer = mixer_of(spec(osc, memories=1, top_k=1, shared=False))
    mixer.path = path
    plain = Model.from_spec({**spec(osc), "mixer": {"kind": "eos", "oscillation": osc}}).double().blocks[0].mixer
    state = {k: v for k, v in mixer.state_dict().items() if not k.startswith("router.")}
    plain.load_state_dict(state)
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), plain(x), rtol=1e-10, atol=1e-12)


def test_under_sequence_parallelism_every_path_runs_dense(monkeypatch):
    # LASP-2 over the M·H heads of the dense path (tests/parallel checks it against one process);
    # the sparse path's packed copies have no per-rank prefix state, so it falls back to dense
    from lcsm import parallel

    model, mixer = mixer_of(spec({"kind": "scalar", "source": "data"}))
    x = torch.randn(1, 4, D, dtype=torch.float64)
    for path in ("auto", "dense", "sparse", "reference"):
        mixer.path = path
        monkeypatch.setattr(parallel, "current", lambda: object())
        assert mixer.choose_path(x) == "dense"
        monkeypatch.undo()
    assert mixer.choose_path(x) == "reference"


def test_a_recipe_may_ask_sequence_parallelism_for_routed_layers():
    from lcsm.config.recipe import load_recipe

    assert load_recipe("mqar_mom_256", ["parallel.sequence=2", "parallel.data=1"]).parallel.sequence == 2


def test_the_pooled_balancing_loss_is_one_loss_over_the_routers_of_all_layers():
    """The default aggregation (aux_loss_scope: pooled) is fla's MoM model's: the router logits of
    all layers concatenated, one Switch loss E·Σ_e f_e P_e over all of them, times the weight;
    per_layer sums one loss per layer (about n_layers times larger at the same weight)."""
    def routed_model(scope):
        torch.manual_seed(0)
        return Model.from_spec({"vocab_size": 40, "d_model": 16, "n_layers": 3, "n_heads": 2, "channel_mixer": {"kind": "none"},
                                "mixer": {"kind": "eos", "oscillation": {"kind": "vector_k"},
                                          "routing": {"memories": 4, "top_k": 2, "aux_loss_scope": scope}}}).double()

    tokens = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    model = routed_model("pooled")
    assert model.spec.mixer.routing.aux_loss_scope == "pooled"  # the default
    # every layer's router logits, from the inputs its mixer sees
    logits, x = [], model.embed(tokens)
    for block in model.blocks:
        h = block.mixer_norm(x)
        logits.append(block.mixer.router.proj(h).flatten(0, 1))
        x = block(x)
    probs = torch.softmax(torch.cat(logits), dim=-1)  # [L·N, E]
    chosen = F.one_hot(probs.topk(2, dim=-1).indices, 4).sum(-2).double()
    expected = 0.01 * 4 * (chosen.mean(0) * probs.mean(0)).sum()
    model(tokens)
    torch.testing.assert_close(model.aux_loss(), expected)
    per_layer = routed_model("per_layer")
    per_layer(tokens)
    layers = [0.01 * 4 * (F.one_hot(p.topk(2, -1).indices, 4).sum(-2).double().mean(0) * p.mean(0)).sum()
              for p in (torch.softmax(l, -1) for l in logits)]
    torch.testing.assert_close(per_layer.aux_loss(), sum(layers))
