#!/usr/bin/env python3
"""The delta rule's two calls side by side in one process, on any backend: the write key formed by
the caller (eos_recurrence(q, β·k, v, w=k)) against fla's form (eos_recurrence(q, k, v, w=k,
beta=β)), which the torch path and the Triton kernels take without forming β·k (docs/kernels.md).
Mean ms of the forward (no gradients) and of forward+backward, for none, g and gk.

    python scripts/delta_forms_ab.py --backend torch --shape 4,512,4,64      # the CPU training path
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lcsm.kernels import eos_recurrence


def case(form: str, B: int, T: int, H: int, D: int, backend: str, device: str):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    gate = {"delta": {}, "delta_scalar": {"g": F.logsigmoid(randn(B, T, H)) / 16},
            "delta_vector_k": {"gk": F.logsigmoid(randn(B, T, H, D)) / 16}}[form]
    leaves = [x.requires_grad_() for x in (randn(B, T, H, D) * D**-0.5, F.normalize(randn(B, T, H, D), dim=-1),
                                           randn(B, T, H, D), torch.sigmoid(randn(B, T, H)), *gate.values())]

    def folded():
        q, k, v, beta, *g = leaves
        return eos_recurrence(q, beta[..., None] * k, v, w=k, backend=backend, **dict(zip(gate, g)))[0]

    def keyed():
        q, k, v, beta, *g = leaves
        return eos_recurrence(q, k, v, w=k, beta=beta, backend=backend, **dict(zip(gate, g)))[0]

    return folded, keyed


def timed(fn, n: int, backward: bool, device: str) -> float:
    def once():
        if backward:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()

    for _ in range(2):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--shape", default="4,512,4,64", help="B,T,H,D (K = V = D)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--forms", nargs="+", default=["delta", "delta_scalar", "delta_vector_k"],
                   choices=["delta", "delta_scalar", "delta_vector_k"])
    args = p.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    device = "cuda" if args.backend == "triton" and torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, B,T,H,D = {B},{T},{H},{D}")
    for form in args.forms:
        folded, keyed = case(form, B, T, H, D, args.backend, device)
        f = [timed(fn, args.steps, False, device) for fn in (folded, keyed)]
        fb = [timed(fn, args.steps, True, device) for fn in (folded, keyed)]
        print(f"{form:<15} fwd: β·k formed {f[0]:7.1f} ms, fla's form {f[1]:7.1f} ms (×{f[0] / f[1]:.2f}) | "
              f"fwd+bwd: {fb[0]:7.1f} ms, {fb[1]:7.1f} ms (×{fb[0] / fb[1]:.2f})", flush=True)


if __name__ == "__main__":
    main()
