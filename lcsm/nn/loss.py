"""The language-model loss without materialising the logits: linear head + cross-entropy, by chunks.

For n labelled positions and a vocabulary of V, the logits are n×V numbers (8×2048 tokens of a
32000-token vocabulary: 2 GiB in fp32, kept for the backward). `linear_cross_entropy` computes the
loss chunk by chunk and, in the same pass, the gradients of the hidden states and of the head
weight (the softmax minus the one-hot target, times the weight or the hidden states): the backward
only scales them. Peak memory is one chunk's logits; FLOPs are those of the head's forward and
backward (no recomputation).
"""

from __future__ import annotations

import torch

from lcsm.nn.fused import gpu_compiled

CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MiB in fp32)
IGNORE = -100  # targets of rows without a loss (torch's ignore_index)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


@gpu_compiled
def _loss_and_grad(logits: torch.Tensor, t: torch.Tensor, acc: torch.dtype, dtype: torch.dtype, with_grad: bool):
    """Σ cross-entropy of one chunk's logits [c, V] against t [c] (IGNORE rows add nothing) and its
    gradient d(Σ)/d logits = softmax − onehot in `dtype` (None without with_grad)."""
    keep = t != IGNORE
    t = torch.where(keep, t, 0)[:, None]
    logits = logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    nll = torch.where(keep, lse - logits.gather(1, t)[:, 0], 0.0).sum()
    if not with_grad:
        return nll, None
    grad = torch.exp(logits - lse[:, None]).scatter_add(1, t, torch.full_like(logits[:, :1], -1.0))
    return nll, (grad * keep[:, None]).to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen here
            return _LinearCrossEntropy._forward(ctx, h, weight, targets, chunk, dtype)

    @staticmethod
    def _forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype):
        n = h.shape[0]
        hc_all = h.to(dtype)
        w = weight.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=h.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for start in range(0, n, chunk):
            hc = hc_all[start : start + chunk]
            t = targets[start : start + chunk]
            nll, grad = _loss_and_grad(hc @ w.t(), t, acc, dtype, need_h or need_w)
            total = total + nll
            if need_h or need_w:
                if need_h:
                    dh[start : start + chunk] = grad @ w
                if need_w:
                    dw += (grad.t() @ hc).to(acc)
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        gh = None if dh is None else (dh * grad.to(dh.dtype)).to(ctx.h_dtype)
        gw = None if dw is None else (dw * grad.to(dw.dtype)).to(ctx.w_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits h @ weightᵀ against targets, never holding all the logits.

    h [n,d], weight [V,d], targets [n] (long; IGNORE = -100 for rows without a loss: they add
    nothing). reduction "sum" or "mean" (over the rows with a target). Computed in the autocast
    dtype when autocast is on (else h's), accumulated in fp32 (fp64 for fp64). chunk: rows per
    chunk (default: CHUNK_ELEMENTS / V).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' (got {reduction!r})")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = _LinearCrossEntropy.apply(h, weight, targets, chunk, _compute_dtype(h))
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum().clamp_min(1).to(total.dtype)
