"""Generation: prefill a prompt with the chunked kernel, then one-token steps from the cache.

    Decoder(model, batch)      prefill(tokens [B,T]) -> logits [B,vocab]; step(tokens [B]) -> logits
    sample(logits, ...)        greedy, temperature, top-k, top-p
    stream(model, prompt, ...) yields the new token ids one by one (a single sequence)
    generate(model, prompt, ...) returns them (a list, or [B,n] for a batch of prompts)

An EOS layer holds a fixed-size state, so each step costs the same at any context length; an
attention layer appends to its KV cache. On CUDA the step of a model whose layers all keep
fixed-size state can be captured once in a CUDA graph and replayed (one launch per token instead
of dozens): the cache's tensors are updated in place (lcsm/cache.py), so the graph's buffers are
the cache itself.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator

import torch

from lcsm.nn.cache import new_cache


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument that is out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r})")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy; got {temperature!r})")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (got {top_k!r})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None (got {top_p!r})")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,vocab] -> tokens [B]. temperature 0 is greedy (argmax); top_k keeps the k most
    likely tokens, top_p the smallest set whose probability reaches p (always at least one)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def supports_cuda_graph(model) -> bool:
    """Every layer keeps fixed-size state updated in place (a KV cache grows: not capturable), and
    no channel mixer sizes its work from the data on the host (MoE: `graph_safe = False`)."""
    return all(
        getattr(block.mixer, "fixed_state", False) and getattr(block.channel_mixer, "graph_safe", True)
        for block in model.blocks
    )


class Decoder:
    """Prefill, then one token at a time, for a batch of B sequences of the same length.

    cuda_graph: capture the one-token step of the model in a CUDA graph at the first step and
    replay it after (CUDA only; needs every layer to keep fixed-size state, see
    supports_cuda_graph). max_len: the longest context expected (sizes KV caches once).
    """

    def __init__(self, model, cuda_graph: bool = False, max_len: int | None = None):
        self.model = model
        self.cache = new_cache(model, max_len)
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph: the model is not on a CUDA device")
        if cuda_graph and not supports_cuda_graph(model):
            raise ValueError("cuda_graph: a layer of this model grows its state (a KV cache); decode it without a CUDA graph")
        self.cuda_graph = cuda_graph
        self.graph = None
        self.length = 0

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] (T >= 1) -> the logits after the last one [B,vocab], fp32."""
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prefill: tokens must be [B,T] with T >= 1 (got shape {tuple(tokens.shape)})")
        logits = self.model(tokens.to(self.device), cache=self.cache, logits_to_keep=1)
        self.length += tokens.shape[1]
        return logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B,vocab] fp32 (the returned tensor is reused by the next step)."""
        tokens = tokens.to(self.device).view(-1, 1)
        self.length += 1
        if not self.cuda_graph:
            return self.model(tokens, cache=self.cache)[:, 0].float()
        if self.graph is None:
            self._capture(tokens)
        self.static_in.copy_(tokens)
        self.graph.replay()
        return self.static_out

    def _capture(self, tokens: torch.Tensor) -> None:
        # The warm-up run (which torch asks for before capturing) and the capture itself would
        # advance the cache: keep a copy and put it back.
        saved = _clone(self.cache)
        self.static_in = tokens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(self.static_in, cache=self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        _restore(self.cache, saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.model(self.static_in, cache=self.cache)[:, 0].float()
        _restore(self.cache, saved)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x


def _restore(x, saved) -> None:
    """Copy `saved` back into the tensors of `x` in place (the graph holds their addresses)."""
    if isinstance(x, torch.Tensor):
        x.copy_(saved)
    elif isinstance(x, dict):
        for k, v in x.items():
            _restore(v, saved[k])
    elif isinstance(x, list):
        for a, b in zip(x, saved):
            _restore(a, b)


def _as_tensor(prompt, device) -> tuple[torch.Tensor, bool]:
    """A prompt (list of ids, [T] or [B,T] tensor) -> ([B,T] long tensor, batched?)."""
    t = torch.as_tensor(prompt, dtype=torch.long, device=device) if not isinstance(prompt, torch.Tensor) else prompt.to(device).long()
    batched = t.dim() == 2
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"prompt: one or more token ids, [T] or [B,T] (got shape {tuple(t.shape)})")
    return t, batched


def _check_vocab(tokens: torch.Tensor, vocab: int, what: str) -> None:
    bad = (tokens < 0) | (tokens >= vocab)
    if bool(bad.any()):
        raise ValueError(f"{what}: token id {int(tokens[bad][0])} is outside the vocabulary [0, {vocab})")


def _steps(model, prompt, max_new_tokens: int, temperature: float, top_k, top_p, seed, eos_token, cuda_graph, precision):
    """Yields [B] token tensors; rows that produced eos_token keep producing it."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    tokens, _ = _as_tensor(prompt, device)
    vocab = model.spec.vocab_size
    _check_vocab(tokens, vocab, "prompt")
    if eos_token is not None and not 0 <= eos_token < vocab:
        raise ValueError(f"eos_token: {eos_token} is outside the vocabulary [0, {vocab})")
    if cuda_graph == "auto":
        cuda_graph = device.type == "cuda" and supports_cuda_graph(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 (got {precision!r})")
    # no autocast weight cache: casts made while a CUDA graph is captured must stay in the graph
    amp = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" else nullcontext()
    was_training = model.training
    model.eval()
    try:
        decoder = Decoder(model, cuda_graph=cuda_graph, max_len=tokens.shape[1] + max_new_tokens)
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        with amp:
            logits = decoder.prefill(tokens)
        for n in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)
            if eos_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
                done |= nxt == eos_token
            yield nxt
            if n + 1 == max_new_tokens or (eos_token is not None and bool(done.all())):
                return
            with amp:
                logits = decoder.step(nxt)
    finally:
        model.train(was_training)


def stream(model, prompt, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, eos_token: int | None = None,
           cuda_graph: bool | str = "auto", precision: str = "fp32") -> Iterator[int]:
    """Yield the new token ids of one sequence as they are sampled (eos_token, if given, is the
    last one yielded). prompt: a list of ids or a [T] tensor. cuda_graph "auto": on CUDA when
    every layer keeps fixed-size state. precision "bf16" runs under autocast."""
    tokens, batched = _as_tensor(prompt, "cpu")
    if batched and tokens.shape[0] != 1:
        raise ValueError("stream: one sequence at a time; use generate() for a batch of prompts")
    for nxt in _steps(model, tokens[0], max_new_tokens, temperature, top_k, top_p, seed, eos_token, cuda_graph, precision):
        yield int(nxt[0])


def generate(model, prompt, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token: int | None = None,
             cuda_graph: bool | str = "auto", precision: str = "fp32"):
    """Sample up to max_new_tokens after `prompt`, stopping at eos_token (included).

    prompt: a list of ids or a [T] tensor -> a list of new ids; a [B,T] tensor -> [B,n] new ids
    (rows that stopped earlier are padded with eos_token). temperature 0 is greedy; seed makes
    sampling reproducible."""
    rows = list(_steps(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, eos_token, cuda_graph, precision))
    out = torch.stack(rows, dim=1).cpu()
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        return out
    return out[0].tolist()
