"""Statistics of an ablation point's model and training, for the report: what `lcsm show` counts
(parameters, recurrent state, FLOPs per token) and the tokens and compute of the run.

Everything comes from the point's resolved recipe (config.yaml) and its final step: the model is
built on the meta device, so nothing is allocated and `lcsm ablate --report` gives the same numbers
for points copied back from a GPU machine without their checkpoints.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from lcsm.config.spec import ModelSpec
from lcsm.nn.model import Model


def train_context(task: dict) -> int:
    """The training sequence length: text's seq_len, else the longest training setting's (MQAR
    and the other synthetic tasks list settings)."""
    if task.get("seq_len"):
        return int(task["seq_len"])
    lengths = [s.get("seq_len", 0) for s in task.get("train", [])]
    return max(lengths) if lengths else 2048


def tokens_per_step(recipe: dict) -> float:
    """Training tokens in one optimizer step: batch × sequence (the example-weighted mean length
    over a mixture of settings, which is what the batches average to)."""
    task = recipe["task"]
    if task.get("seq_len"):
        return float(recipe["batch_size"] * task["seq_len"])
    settings = task.get("train", [])
    n = sum(s.get("num_examples", 1) for s in settings)
    mean = sum(s.get("seq_len", 0) * s.get("num_examples", 1) for s in settings) / max(n, 1)
    return recipe["batch_size"] * mean


def idle_parameters(model: Model) -> int:
    """Parameters a token does not use: the routed memories it is not sent to (a Mixture-of-Memories
    mixer's per-memory stages, E − top_k of its M memories) and the experts of an MoE channel mixer
    it is not sent to. Read from the modules' routing attributes (E, top_k / k, M, per_memory)."""
    idle = 0
    for m in model.modules():
        per_memory = getattr(m, "per_memory", None)
        if per_memory and all(hasattr(m, a) for a in ("E", "top_k", "M")):
            stages = sum(p.numel() for name in per_memory for p in getattr(m, name).parameters())
            idle += stages * (m.E - m.top_k) // m.M  # the stages hold M equal blocks, one per memory
        elif all(hasattr(m, a) for a in ("w_gate", "w_up", "w_down", "E", "k")):
            experts = m.w_gate.numel() + m.w_up.numel() + m.w_down.numel()
            idle += experts * (m.E - m.k) // m.E
    return idle


@lru_cache(maxsize=256)
def _model_stats(model_json: str, context: int) -> dict:
    spec = ModelSpec.model_validate(json.loads(model_json))
    with torch.device("meta"):  # counts without allocating
        model = Model(spec)
    rows = model.summary(context=context)
    grows = any(r.state_grows for r in rows)
    return {
        "parameters": model.num_parameters(),
        # the blocks only: embeddings, the final norm and the LM head are left out, as scaling-law
        # papers count N (and as the FLOPs below, which are the blocks')
        "non_embedding_parameters": sum(r.parameters for r in rows),
        # what one token uses: a routed model's memories and experts it is not sent to left out
        "active_parameters": sum(r.parameters for r in rows) - idle_parameters(model),
        # numbers kept per sequence by all layers; a KV cache counted at the training length
        "state_size": sum(r.state_size * (context if r.state_grows else 1) for r in rows),
        "state_grows": grows,
        # forward FLOPs per token of the blocks (matmuls and the recurrence / attention at `context`)
        "flops_per_token": sum(r.flops_per_token for r in rows),
        "context": context,
    }


def model_stats(recipe: dict) -> dict:
    """{parameters, non_embedding_parameters, active_parameters, state_size, state_grows, flops_per_token, context}
    of a resolved recipe's model at its training context."""
    return dict(_model_stats(json.dumps(recipe["model"], sort_keys=True), train_context(recipe["task"])))


def run_stats(recipe: dict, step: int | None) -> dict:
    """model_stats plus the run's training tokens and compute at `step` (the final step; None: not
    finished). Compute is 3 × forward FLOPs per token × tokens: the backward pass costs twice the
    forward, the usual 6·N·D with the recurrence and attention terms included."""
    out = model_stats(recipe)
    if step is not None:
        tokens = step * tokens_per_step(recipe)
        out["tokens"] = tokens
        out["compute"] = 3.0 * out["flops_per_token"] * tokens
    return out


def si(x: float) -> str:
    """1234567 -> '1.23M', as lcsm show prints sizes (and T, P, E for compute)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:g}"
