"""Decoding: the cache protocol gives the full forward's logits for every zoo model, sampling,
model.generate, `lcsm generate` and `lcsm bench decode --small`."""

import json
import os

import pytest
import torch

from lcsm.nn.cache import new_cache
from lcsm.cli.main import main
from lcsm.nn.generate import Decoder, _clone, _restore, generate, sample, stream
from lcsm.nn.model import Model
from lcsm.config.spec import ModelSpec, load_model_spec
from lcsm.run.trainer import train
from lcsm.config.recipe import load_recipe
from lcsm.config.paths import zoo_paths

from helpers import cli_error  # tests/helpers.py (tests/ is on sys.path)

VOCAB, T = 50, 11


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSM_CACHE", str(tmp_path / "cache"))


def tiny_zoo(name: str, **changes) -> Model:
    """A zoo model at d_model 32, 2 layers, 2 heads, a 50-token vocabulary (its stages unchanged).

    Weights are drawn larger than the training init so that the state carried between tokens
    (conv tails, positions, normalisers) visibly moves the logits: a missing piece fails the test.
    """
    data = load_model_spec(name).model_dump(exclude_unset=True)
    data.update(d_model=32, n_layers=2, n_heads=2, vocab_size=VOCAB, **changes)
    if data.get("pattern"):  # a hybrid: one layer of each mixer it names
        data["pattern"] = ["mixer", *data["mixers"]]
        data["n_layers"] = len(data["pattern"])
    for key in ("heads", "head_k", "head_v"):
        data["mixer"].pop(key, None)
    osc = data["mixer"].get("oscillation", {})
    if osc.get("max_len"):  # cosFormer's angle step π/(2·max_len): make positions matter within T tokens
        osc["max_len"] = 4
    torch.manual_seed(0)
    model = Model(ModelSpec.model_validate(data)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def stepwise(model, tokens, cache=None) -> torch.Tensor:
    cache = new_cache(model) if cache is None else cache
    return torch.cat([model(tokens[:, t : t + 1], cache=cache) for t in range(tokens.shape[1])], dim=1)


ZOO = sorted(zoo_paths())


@pytest.mark.parametrize("name", ZOO)
def test_step_by_step_decoding_gives_the_full_forward(name):
    model = tiny_zoo(name)
    tokens = torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        steps = stepwise(model, tokens)
        cache = new_cache(model)
        prefill = model(tokens[:, :6], cache=cache)
        then = stepwise(model, tokens[:, 6:], cache)
        cache = new_cache(model)  # prefill in two chunks: continuing with T > 1 from a state
        chunks = torch.cat([model(tokens[:, :4], cache=cache), model(tokens[:, 4:], cache=cache)], dim=1)
    assert rel(steps, full) < 1e-4
    assert rel(torch.cat([prefill, then], dim=1), steps) < 1e-4
    assert rel(chunks, full) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("name", ["gla", "mamba", "cosformer"])
def test_triton_prefill_and_step_give_the_full_forward(name):
    """The GPU path (chunked kernel with h0 / final state, the in-place Triton step), here under
    the Triton interpreter: decays along K, a K×V decay with Δ, and rotated positions."""
    model = tiny_zoo(name)
    # Mamba's K×V decay runs the scan kernels, whose associative scan the interpreter steps through
    # element by element: one sequence there
    batch = 1 if name == "mamba" else 2
    tokens = torch.randint(VOCAB, (batch, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        model.set_backend("triton")
        cache = new_cache(model)
        out = torch.cat([model(tokens[:, :3], cache=cache), stepwise(model, tokens[:, 3:], cache)], dim=1)
    assert rel(out, full) < 1e-4


def _break(model, name):
    """Forget one piece of carried state, to show the test above would catch it."""
    if name == "cosformer":  # positions restart at 0 each call (the offset is lost)
        for block in model.blocks:
            block.mixer.oscillation.forward = (lambda f: lambda x, positions, cache=None: f(x, positions - positions[0], cache))(block.mixer.oscillation.forward)
    elif name == "cumsoftmax":  # the running normaliser is dropped
        for block in model.blocks:
            block.mixer.oscillation.forward = (lambda f: lambda x, positions, cache=None: f(x, positions, None))(block.mixer.oscillation.forward)
    elif name == "mamba2":  # the short convolutions forget their tails
        for block in model.blocks:
            for stage in (block.mixer.input, block.mixer.expand, block.mixer.shrink):
                stage.proj.conv.forward = (lambda f: lambda x, cache=None: f(x, {}))(stage.proj.conv.forward)


@pytest.mark.parametrize("name", ["cosformer", "cumsoftmax", "mamba2"])
def test_the_decoding_check_catches_a_forgotten_state(name):
    model = tiny_zoo(name)
    _break(model, name)
    tokens = torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(stepwise(model, tokens), model(tokens)) > 1e-3


def _fixed_state(name: str) -> bool:
    """No attention layer (a KV cache grows with the context, so it is not updated in place)."""
    spec = load_model_spec(name)
    return spec.mixer.kind == "eos" and all(m.kind == "eos" for m in (getattr(spec, "mixers", None) or {}).values())


@pytest.mark.parametrize("name", [n for n in ZOO if _fixed_state(n)])
def test_a_step_updates_the_cache_in_place(name):
    """What a captured CUDA graph relies on: after the prefill, a step changes only the contents
    of the cache's tensors; putting the old contents back replays the same step exactly."""
    model = tiny_zoo(name)
    tokens = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        decoder = Decoder(model)
        decoder.prefill(tokens)
        ptrs = {id(t): t.data_ptr() for t in _tensors(decoder.cache)}
        saved = _clone(decoder.cache)
        first = decoder.step(tokens[:, 0]).clone()
        assert {id(t): t.data_ptr() for t in _tensors(decoder.cache)} == ptrs
        _restore(decoder.cache, saved)
        torch.testing.assert_close(decoder.step(tokens[:, 0]), first, rtol=0, atol=0)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, list):
        return [t for v in x for t in _tensors(v)]
    return []


def test_kv_cache_grows_or_is_sized_once():
    model = tiny_zoo("transformer")
    tokens = torch.randint(VOCAB, (1, 40))
    with torch.no_grad():
        full = model(tokens)
        grown = new_cache(model)
        out = torch.cat([model(tokens[:, :3], cache=grown)] + [model(tokens[:, t : t + 1], cache=grown) for t in range(3, 40)], 1)
        assert grown[0]["len"] == 40 and grown[0]["k"].shape[2] >= 40
        sized = new_cache(model, max_len=64)
        model(tokens[:, :3], cache=sized)
        assert sized[0]["k"].shape[2] == 64
    assert rel(out, full) < 1e-4


# --------------------------------------------------------------------------- sampling


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])).repeat(2000, 1)
    assert sample(logits, temperature=0).eq(0).all()
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(sample(logits, generator=g(3)), sample(logits, generator=g(3)))
    assert not torch.equal(sample(logits, generator=g(3)), sample(logits, generator=g(4)))
    assert set(sample(logits, generator=g(0)).tolist()) == {0, 1, 2, 3, 4}
    assert set(sample(logits, top_k=2, generator=g(0)).tolist()) == {0, 1}
    assert set(sample(logits, top_p=0.7, generator=g(0)).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, top_p=0.5, generator=g(0)).tolist()) == {0}
    assert set(sample(logits, top_p=0.85, generator=g(0)).tolist()) == {0, 1, 2}
    freq = sample(logits, temperature=100.0, generator=g(0)).bincount(minlength=5) / 2000
    assert freq.min() > 0.1  # a high temperature flattens the distribution


def test_generate_greedy_seed_eos_and_batches():
    model = tiny_zoo("gla")
    prompt = [1, 2, 3, 4]
    with torch.no_grad():
        greedy = model.generate(prompt, 6, temperature=0)
        tokens = torch.tensor([prompt])
        for t in greedy:  # greedy = argmax of the full forward, token by token
            assert int(model(tokens)[0, -1].argmax()) == t
            tokens = torch.cat([tokens, torch.tensor([[t]])], 1)
    assert model.generate(prompt, 8, seed=5) == model.generate(prompt, 8, seed=5)
    assert model.generate(prompt, 8, seed=5) != model.generate(prompt, 8, seed=6)
    assert list(stream(model, prompt, 8, seed=5)) == model.generate(prompt, 8, seed=5)
    assert generate(model, prompt, 6, temperature=0, eos_token=greedy[2]) == greedy[:3]
    batch = torch.tensor([prompt, [5, 6, 7, 8]])
    out = model.generate(batch, 5, temperature=0)
    assert out.shape == (2, 5) and out[0].tolist() == greedy[:5]


@pytest.mark.parametrize("bad, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"eos_token": VOCAB}, "eos_token"),
])
def test_generate_rejects_bad_arguments(bad, match):
    model = tiny_zoo("gla")
    kwargs = {"max_new_tokens": 3, **bad}
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2], **kwargs)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([1, VOCAB])
    with pytest.raises(ValueError, match="cuda_graph"):
        Decoder(model, cuda_graph=True)


# --------------------------------------------------------------------------- the command line


def tiny_run(tmp_path, task: dict, name: str) -> str:
    recipe = load_recipe({
        "name": name,
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "channel_mixer": {"kind": "none"},
                  "mixer": {"kind": "eos", "expand": {"conv": 2}, "oscillation": {"kind": "scalar", "source": "data"}}},
        "task": task, "batch_size": 8, "steps": 3, "eval_every": 3, "out_dir": str(tmp_path / name),
    })
    train(recipe, quiet=True)
    return str(recipe.run_dir)


def test_cli_generate_streams_text_and_rejects_bad_input(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tiny_run(tmp_path, {"kind": "text", "corpus": str(corpus), "seq_len": 16, "val_fraction": 0.2}, "text")
    assert main(["generate", run, "--prompt", "the quick", "--max-tokens", "12", "--greedy", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the quick")
    from lcsm.run.evaluate import load_run

    _, model, _, _ = load_run(run)
    expected = bytes(model.generate(list(b"the quick"), 12, temperature=0)).decode("utf-8", errors="replace")
    assert printed == "the quick" + expected + "\n"
    assert main(["generate", run, "--prompt", "a", "--max-tokens", "5", "--top-k", "3", "--top-p", "0.9", "--seed", "1", "--ids",
                 "--quiet-prompt", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) == 5
    assert "no such run directory" in cli_error(["generate", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert "--temperature must be >= 0" in cli_error(["generate", run, "--prompt", "x", "--temperature", "-1"], capsys)
    assert "--top-p must be in (0, 1]" in cli_error(["generate", run, "--prompt", "x", "--top-p", "2"], capsys)
    assert "--top-k must be a positive integer" in cli_error(["generate", run, "--prompt", "x", "--top-k", "0"], capsys)
    assert "--max-tokens must be a positive integer" in cli_error(["generate", run, "--prompt", "x", "--max-tokens", "0"], capsys)
    assert "give a prompt" in cli_error(["generate", run], capsys)
    assert "outside the model's vocabulary" in cli_error(["generate", run, "--tokens", "300"], capsys)
    assert "--eos-token" in cli_error(["generate", run, "--prompt", "x", "--eos-token", "999"], capsys)


def test_cli_generate_token_ids_for_runs_without_text(tmp_path, capsys):
    task = {"kind": "mqar", "vocab_size": 32, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 16}],
            "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 8}]}
    run = tiny_run(tmp_path, task, "mqar")
    assert "--tokens 1,2,3" in cli_error(["generate", run, "--prompt", "hello"], capsys)
    assert "comma-separated token ids" in cli_error(["generate", run, "--tokens", "1,x"], capsys)
    assert main(["generate", run, "--tokens", "1,2,3", "--max-tokens", "4", "--greedy", "--device", "cpu"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert len(ids) == 4 and all(0 <= t < 32 for t in ids)


def test_bench_decode_small_runs_on_the_cpu(tmp_path, capsys):
    path = tmp_path / "decode.json"
    assert main(["bench", "decode", "--small", "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert {(r["model"], r["context"]) for r in report["models"]} == {(m, c) for m in ("gla", "transformer") for c in (64, 256)}
    assert all(r["ms_per_token"] > 0 for r in report["models"])
    gla = [r["cache_MiB"] for r in report["models"] if r["model"] == "gla"]
    attn = [r["cache_MiB"] for r in report["models"] if r["model"] == "transformer"]
    assert gla[0] == gla[1] and attn[1] > attn[0]  # fixed state vs a KV cache that grows
    assert "ms/token" in capsys.readouterr().out
