"""The spec language: what it accepts, what it rejects and how it says so."""

import itertools
import re
import json

import pytest
import torch
import yaml

from lcsm.cli.main import main
from lcsm.nn.model import Model
from lcsm.config.spec import ModelSpec, SpecError, load_model_spec

BASE = {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2}


def spec_with(mixer: dict, **model) -> dict:
    return {**BASE, **model, "mixer": {"kind": "eos", **mixer}}


def error_of(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        load_model_spec(data)
    return str(info.value)


# --------------------------------------------------------------------------- rejected specs

BAD = [
    # (spec, the YAML path the message must name, words it must contain)
    (spec_with({"oscillation": {"kind": "vectr_k"}}), "mixer.oscillation", "unknown kind 'vectr_k'; allowed: ones, scalar, vector_k"),
    (spec_with({"oscillation": {"kind": "vector_k", "taus": 2}}), "mixer.oscillation.taus", "did you mean 'tau'"),
    (spec_with({"oscillation": {"kind": "scalar"}}, n_layers="two"), "n_layers", "valid integer"),
    (spec_with({"oscillation": {"kind": "scalar", "tau": 0}}), "mixer.oscillation.tau", "greater than 0"),
    (spec_with({"oscillation": {"kind": "scalar", "tau": -3}}), "mixer.oscillation.tau", "greater than 0"),
    (spec_with({"oscillation": {"kind": "ones"}}, n_heads=3), "n_heads", "must divide d_model"),
    ({**BASE, "n_heads": 3, "mixer": {"kind": "attention"}}, "n_heads", "must divide d_model"),
    (spec_with({"head_k": 5, "oscillation": {"kind": "rotation"}}), "mixer.head_k", "even K"),
    (spec_with({"oscillation": {"kind": "delta"}}), "mixer.expand.norm", "a delta oscillation needs L2-normalised keys"),
    (spec_with({"oscillation": {"kind": "delta", "decay": {"kind": "outer"}}}), "mixer.oscillation.decay", "allowed: ones, scalar, vector_k"),
    (spec_with({"oscillation": {"kind": "delta", "beta": {"source": "data", "value": 0.5}}, "expand": {"norm": "l2"}}),
     "mixer.oscillation.beta.value", "value only applies with source: fixed"),
    (spec_with({"oscillation": {"kind": "matrix"}}), "mixer.oscillation", "general K×K matrix oscillations are not supported"),
    (spec_with({"oscillation": {"kind": "vector_k", "source": "fixed"}}), "mixer.oscillation.source", "allowed: data, param"),
    (spec_with({"oscillation": {"kind": "scalar", "source": "fixed", "tau": 4}}), "mixer.oscillation.tau", "not used with source: fixed"),
    (spec_with({"oscillation": {"kind": "scalar", "parametrization": "exp_softplus", "tau": 4}}), "mixer.oscillation.tau", "only applies with parametrization: sigmoid_tau"),
    (spec_with({"oscillation": {"kind": "scalar", "lower_bound": 0.5}}), "mixer.oscillation.lower_bound", "parametrization: lower_bound"),
    (spec_with({"oscillation": {"kind": "scalar", "parametrization": "lower_bound", "lower_bound": 1.5}}), "mixer.oscillation.lower_bound", "[0, 1)"),
    (spec_with({"oscillation": {"kind": "scalar", "source": "param", "rank": 4}}), "mixer.oscillation.rank", "source: data"),
    (spec_with({"oscillation": {"kind": "scalar", "parametrization": "sigmoid"}}), "mixer.oscillation.parametrization", "allowed: sigmoid_tau, exp_softplus, lower_bound"),
    (spec_with({"expand": {"feature_map": "gelu"}, "oscillation": {"kind": "ones"}}), "mixer.expand.feature_map", "allowed: identity, relu, sigmoid"),
    (spec_with({"expand": {"tie": "one_minus_oscillation"}, "oscillation": {"kind": "outer"}}), "mixer.expand.tie", "a decay along K (scalar, vector_k"),
    (spec_with({"expand": {"tie": "one_minus_oscillation", "source": "data"}, "oscillation": {"kind": "vector_k"}}), "mixer.expand.tie", "remove 'source'"),
    (spec_with({"shrink": {"tie": "one_minus_oscillation"}, "oscillation": {"kind": "vector_k"}}), "mixer.shrink.tie", "expand stage only"),
    (spec_with({"input": {"scale_by": "dt"}, "oscillation": {"kind": "scalar"}}), "mixer.input.scale_by", "exp_softplus"),
    (spec_with({"expand_k": 0.3, "oscillation": {"kind": "ones"}}), "mixer.expand_k", "whole multiple of heads"),
    (spec_with({"head_k": 8, "expand_k": 0.5, "oscillation": {"kind": "ones"}}), "mixer.expand_k", "not both"),
    (spec_with({"oscillation": {"kind": "rotation"}, "expand": {"source": "param"}}), "mixer.expand.source", "data-dependent"),
    (spec_with({"expand": {"source": "fixed", "feature_map": "relu"}, "oscillation": {"kind": "ones"}}), "mixer.expand.feature_map", "no effect"),
    (spec_with({"output": {"gate_rank": 4}, "oscillation": {"kind": "ones"}}), "mixer.output.gate_rank", "needs an output gate"),
    ({**BASE, "mixer": {"kind": "rnn"}}, "mixer", "allowed: eos, attention"),
    ({**BASE, "mixer": {"oscillation": {"kind": "ones"}}}, "mixer", "missing 'kind'"),
    (spec_with({}), "mixer.oscillation", "required field is missing"),
    ({**BASE, "mixer": {"kind": "attention"}, "channel_mixer": {"kind": "lstm"}}, "channel_mixer", "allowed: glu, mlp, none, moe"),
    ({**BASE, "mixer": {"kind": "attention"}, "d_modle": 3}, "d_modle", "did you mean 'd_model'"),
]


@pytest.mark.parametrize("data,path,words", BAD, ids=[b[1] + ":" + b[2][:24] for b in BAD])
def test_bad_specs_name_the_field_and_what_is_allowed(data, path, words):
    msg = error_of(data)
    assert f"{path}: " in msg, msg
    assert words in msg, msg
    assert "Traceback" not in msg and "pydantic" not in msg.lower()


def test_error_names_the_yaml_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("d_model: 16\nn_layers: 2\nmixer:\n  kind: eos\n  oscillation:\n    kind: scalar\n    tau: -1\n")
    with pytest.raises(SpecError, match=r"bad.yaml:7: mixer.oscillation.tau"):
        load_model_spec(path)


def test_cli_validate_exit_code_and_message(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_with({"oscillation": {"kind": "vector_k"}})))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_with({"oscillation": {"kind": "vector_k", "tau": 0}})))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "mixer.oscillation.tau" in captured.err and "Traceback" not in captured.err
    assert main(["show", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("d_model: [1\n")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_zoo_show_schema(capsys):
    assert main(["zoo"]) == 0
    listing = capsys.readouterr().out
    assert "gla" in listing and "mamba2" in listing and "transformer" in listing
    assert main(["show", "gla"]) == 0
    shown = capsys.readouterr().out
    assert "vector_k data sigmoid_tau" in shown and "FLOPs/token" in shown
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "mixer" in schema["properties"] and "EOSMixer" in schema["$defs"]


# --------------------------------------------------------------------------- accepted specs


OSCILLATIONS = [
    {"kind": "ones"},
    *[{"kind": "scalar", "source": "fixed", "slopes": s} for s in ("alibi", "tnl", "retnet")],
    *[{"kind": k, "source": src, "parametrization": p}
      for k, src, p in itertools.product(("scalar", "vector_k", "vector_v", "outer"), ("data", "param"),
                                         ("sigmoid_tau", "exp_softplus", "lower_bound"))],
    {"kind": "vector_k", "parametrization": "lower_bound", "lower_bound": 0.3, "rank": 4},
    {"kind": "vector_k", "parametrization": "lower_bound", "lower_bound": "layerwise"},
    {"kind": "full", "source": "data", "parametrization": "exp_softplus", "rank": 4},
    {"kind": "full", "source": "param", "parametrization": "exp_softplus"},
    {"kind": "full", "source": "data", "parametrization": "sigmoid_tau", "tau": 4},
    {"kind": "full", "source": "param", "parametrization": "sigmoid_tau"},
    {"kind": "rotation", "theta": "rope"},
    {"kind": "rotation", "theta": "uniform", "max_len": 64},
    {"kind": "rotation", "theta": "learned"},
    {"kind": "cumsoftmax", "along": "head"},
    {"kind": "cumsoftmax", "along": "k", "rank": 4},
]


def _id(o):
    return "-".join(str(v) for v in o.values())


@pytest.mark.parametrize("osc", OSCILLATIONS, ids=[_id(o) for o in OSCILLATIONS])
def test_every_oscillation_builds_and_backends_agree(osc):
    """Each oscillation, through a whole model, gives the same logits and gradients on the chunked/
    sequential torch path as on the reference loop."""
    torch.manual_seed(0)
    model = Model.from_spec(spec_with({"oscillation": osc})).double()
    tokens = torch.randint(0, 64, (2, 21))
    grads = []
    for backend in ("reference", "torch"):
        model.zero_grad()
        logits = model.set_backend(backend)(tokens)
        logits.pow(2).mean().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ref, ref_grads), (ours, our_grads) = grads
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert len(ref_grads) == len(our_grads)
    for a, b in zip(our_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


STAGE_VARIANTS = [
    {"expand": {"source": s1, **({"feature_map": fm} if s1 != "fixed" else {})},
     "shrink": {"source": s2, **({"feature_map": fm} if s2 != "fixed" else {})}}
    for (s1, s2), fm in zip(itertools.product(("data", "param", "fixed"), repeat=2),
                            itertools.cycle(["identity", "relu", "sigmoid", "elu_plus_one", "silu", "elu", "relu_squared", "square"]))
] + [
    {"input": {"feature_map": "silu", "conv": 3}, "expand": {"conv": 2, "scale": "rsqrt_k"}, "shrink": {"conv": 4, "scale": 0.5}},
    {"output": {"norm": "layernorm", "norm_scope": "all", "gate": "sigmoid", "gate_rank": 3, "skip": True}},
    {"output": {"norm": "none", "gate": "silu", "gate_first": True}, "bias": True, "expand_v": 2.0},
    {"heads": 4, "head_k": 3, "head_v": 5},
]


@pytest.mark.parametrize("variant", STAGE_VARIANTS)
def test_stage_variants_build_and_run(variant):
    spec = load_model_spec(spec_with({"oscillation": {"kind": "vector_k"}, **variant}))
    model = Model(spec)
    logits = model(torch.randint(0, 64, (2, 7)))
    assert logits.shape == (2, 7, 64) and torch.isfinite(logits).all()


def test_one_minus_oscillation_tie_is_hgrn2_key():
    spec = spec_with({"expand": {"tie": "one_minus_oscillation"}, "oscillation": {"kind": "scalar"}})
    model = Model.from_spec(spec).double()
    mixer = model.blocks[0].mixer
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    osc = mixer.oscillation(x, torch.arange(5))
    e = mixer.expand(x, osc)
    assert torch.allclose(e, (1 - torch.exp(osc.decay.g))[..., None].expand_as(e))


def test_dims_resolution_and_defaults():
    spec = load_model_spec(spec_with({"expand_k": 0.5, "expand_v": 2.0, "oscillation": {"kind": "ones"}}))
    assert spec.mixer.dims(16, 2) == (2, 4, 16)
    assert isinstance(spec, ModelSpec) and spec.channel_mixer.kind == "glu" and spec.tie_embeddings


def test_model_reports_state_size():
    model = Model.from_spec(spec_with({"input": {"conv": 4}, "oscillation": {"kind": "ones"}}))
    row = model.summary()[0]
    H, K, V = 2, 8, 8
    assert row.state_size == H * K * V + 3 * H * V and not row.state_grows
    assert row.parameters == sum(p.numel() for p in model.blocks[0].parameters())


# --------------------------------------------------------------------------- hybrid patterns

HYBRID = {"d_model": 16, "n_layers": 4, "n_heads": 2, "mixer": {"kind": "eos", "oscillation": {"kind": "ones"}},
          "mixers": {"attn": {"kind": "attention"}}}


def test_hybrid_pattern_string_and_list():
    from lcsm.config.spec import load_model_spec

    a = load_model_spec(HYBRID | {"pattern": "mixer*3 attn"})
    b = load_model_spec(HYBRID | {"pattern": ["mixer", "mixer", "mixer", "attn"]})
    assert a.pattern == b.pattern == ["mixer"] * 3 + ["attn"]
    assert [a.layer_mixer(l).kind for l in range(4)] == ["eos"] * 3 + ["attention"]
    c = load_model_spec(HYBRID | {"n_layers": 4, "pattern": "mixer attn"})
    assert [c.layer_mixer(l).kind for l in range(4)] == ["eos", "attention"] * 2


@pytest.mark.parametrize(
    "change,message",
    [
        ({"pattern": "mixer*3 mlp"}, "pattern: unknown mixer 'mlp'; allowed: mixer, attn"),
        ({"pattern": "mixer*2 attn"}, "the pattern has 3 layers, which must divide n_layers = 4"),
        ({"pattern": "mixer*x"}, "a repeat is name*N"),
        ({}, "named mixers need a `pattern`"),
        ({"pattern": "attn", "mixers": {"attn": {"kind": "attention", "heads": 3}}}, "heads = 3 must divide d_model = 16"),
    ],
)
def test_hybrid_pattern_errors(change, message):
    from lcsm.config.spec import SpecError, load_model_spec

    with pytest.raises(SpecError, match=re.escape(message)):
        load_model_spec(HYBRID | change)


def test_show_prints_the_pattern_and_the_experts(tmp_path, capsys):
    assert main(["show", "hybrid_gla"]) == 0
    shown = capsys.readouterr().out
    assert "pattern      mixer mixer mixer mixer mixer mixer mixer attn" in shown and "attention" in shown
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(HYBRID | {"pattern": "mixer attn", "channel_mixer": {"kind": "moe", "experts": 4, "shared_expert": True}}))
    assert main(["show", str(path)]) == 0
    assert "moe: 4 experts, top-2, shared expert, dropless" in capsys.readouterr().out


def test_cli_validate_refuses_unreadable_huge_and_absurd_specs_quickly(tmp_path, capsys):
    import time

    from helpers import cli_error  # tests/helpers.py

    osc = "mixer: {kind: eos, oscillation: {kind: scalar}}\n"
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: café\nd_model: 16\nn_layers: 1\n".encode("latin-1") + osc.encode())
    assert f"{latin}: not UTF-8 text: byte 0xe9 at offset 9" in cli_error(["validate", str(latin)], capsys)
    cases = [
        ("d_model: 1000000000000000000000000000000", "d_model: 100000000000...(31 digits) is too large; integers must fit in 64 bits"),
        ("d_model: 1000000000", "parameters in the embeddings alone, beyond lcsm's limit of 1T"),
        ("d_model: 10000000\nvocab_size: 2", "parameters, beyond lcsm's limit of 1T"),  # the channel mixer: 2.7e14 weights
        ("d_model: 16\nn_layers: 1000000000", "model: about "),  # counted from one layer, not built 10^9 times
    ]
    for n, (fields, words) in enumerate(cases):
        path = tmp_path / f"big{n}.yaml"
        path.write_text(("n_layers: 2\n" if "n_layers" not in fields else "") + fields + "\n" + osc)
        t0 = time.perf_counter()
        msg = cli_error(["validate", str(path)], capsys)
        assert words in msg and time.perf_counter() - t0 < 30, (fields, msg)
    assert "d_model = 16, n_layers = 1000000000" in msg and "beyond lcsm's limit" in msg
