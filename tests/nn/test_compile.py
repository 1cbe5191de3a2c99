"""torch.compile(model, fullgraph=True) captures lcsm models whole — training (loss and every
gradient) and inference (logits, and one decoding step from the cache) — on the torch backend
(traced) and the Triton backend (the custom ops of lcsm/kernels/ops.py; on the CPU the Triton
interpreter runs them), and the compiled model equals the eager one.

The compiler backend is aot_eager: it runs dynamo's capture with fullgraph (any graph break is an
error) and AOTAutograd's joint forward-backward, which is what these tests are about; inductor's
code generation is torch's own business (`compile: true` in a recipe uses it)."""

import os

import pytest
import torch

from lcsm.config.spec import load_model_spec
from lcsm.nn.cache import new_cache
from lcsm.nn.model import Model

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
CASES = [("gla", "torch"), ("mamba2", "torch"), ("mom_gla", "torch"), ("hybrid_gla", "torch"), ("gated_deltanet", "torch"),
         ("retnet", "torch"), ("cosformer", "torch"), ("linear_attention", "torch")]  # fixed decays and fixed angles: constants outside the buffers
if TRITON:
    CASES += [("gla", "triton"), ("gated_deltanet", "triton")]  # the delta rule's op in fla's form (beta, w = e)


def tiny(name: str, backend: str, n_layers: int = 1) -> Model:
    """One layer of two heads (a hybrid: one EOS layer, one attention layer). Capture time goes with
    the number of traced ops, so with the layers; the interpreter's with the heads."""
    data = load_model_spec(name).model_dump(exclude_unset=True)
    data.update(vocab_size=48, d_model=32, n_layers=n_layers, n_heads=2)
    if data.get("pattern"):
        data.update(pattern="mixer attn", n_layers=2)
    torch.manual_seed(0)
    return Model.from_spec(data).set_backend(backend)


def assert_trains_alike(model, eager, compiled) -> None:
    """eager() and compiled() -> the loss of `model`: equal losses and parameter gradients."""
    loss = eager()
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = compiled()
    got.backward()
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name,backend", CASES)
def test_the_compiled_model_trains_like_the_eager_one(name, backend):
    torch._dynamo.reset()
    model = tiny(name, backend)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 48, (2, 12), generator=gen)
    labels = torch.randint(0, 48, (2, 12), generator=gen)
    labels[:, :3] = -100
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():  # compiled before any eager call (as `compile: true` runs): nothing is cached yet
        first = compiled(tokens)
    assert_trains_alike(model, lambda: model(tokens, labels), lambda: compiled(tokens, labels))
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON else []))
def test_a_compiled_decoding_step_equals_the_eager_one(backend):
    torch._dynamo.reset()
    model = tiny("gla", backend).eval()
    tokens = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(2))
    step = torch.compile(lambda t, cache: model(t, cache=cache), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, compiled = new_cache(model), new_cache(model)
        model(tokens[:, :-1], cache=eager)
        model(tokens[:, :-1], cache=compiled)
        torch.testing.assert_close(step(tokens[:, -1:], compiled), model(tokens[:, -1:], cache=eager), rtol=1e-5, atol=1e-5)


def test_compile_blocks_compiles_every_block_in_place():
    torch._dynamo.reset()
    model = tiny("gla", "torch", n_layers=2)
    model.compile_blocks(backend="aot_eager")
    tokens = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(3))
    loss = model(tokens, tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_forward_of_compiled_blocks_starts_a_cuda_graph_step(monkeypatch):
    # compile: {mode: reduce-overhead} replays CUDA graphs whose outputs the next replay
    # overwrites; without a step mark per forward, the first evaluation of an H200 run read
    # overwritten outputs and failed. The mark comes from Model.forward, once per call, only
    # with compiled blocks and never from inside a whole-model capture.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny("gla", "torch", n_layers=2)
    tokens = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(3))
    model(tokens, tokens)
    assert marks == []  # eager blocks: nothing to mark
    torch._dynamo.reset()
    model.compile_blocks(backend="aot_eager")
    model(tokens, tokens).backward()
    with torch.no_grad():  # evaluation: no backward to end the step
        model(tokens, tokens, reduction="sum", return_logits=True)
        model(tokens)
    assert marks == [1, 1, 1]
    whole = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        whole(tokens)
    assert marks == [1, 1, 1]


@pytest.mark.parametrize("name", ["hgrn2", "retnet", "gla"])
def test_compiled_blocks_share_one_graph_across_many_layers(name):
    # Model.compile_blocks (`compile: true`) compiles Block.forward once for every layer: a block
    # that specialised on its layer (HGRN2's layer-wise bound once did) would recompile per layer
    # and fail past dynamo's recompile limit (8) with fullgraph
    torch._dynamo.reset()
    model = tiny(name, "torch", n_layers=10)
    tokens = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(2))

    def compiled():
        model.compile_blocks(backend="aot_eager", dynamic=False)
        return model(tokens, tokens)

    assert_trains_alike(model, lambda: model(tokens, tokens), compiled)
