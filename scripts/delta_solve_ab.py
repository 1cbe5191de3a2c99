#!/usr/bin/env python3
"""The delta kernels' solve settings side by side in one process (GPU): T = (I + A)⁻¹ kept in fp32 or
in the inputs' dtype (LCSM_DELTA_T), the solve's 16×16 block products in ieee, tf32x3 or tf32
(LCSM_DELTA_SOLVE). For every setting: ms of the forward and of forward+backward beside fla-core's
kernel on the same leaves (lcsm bench kernels' timer), and the largest bf16 relative error of the
output and every gradient against the fp64 torch path over gates 1e-3 / 5 and β = σ(z) / β ∈ [0.9, 1]
(the fp64 oracle computed once per case and shared by the settings).

    python scripts/delta_solve_ab.py --forms delta_scalar delta --shape 8,4096,16,128 --check-shape 2,4096,8,128
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lcsm.bench.kernels import BETAS, _rel, delta_case, fwd_bwd, leaf_grads, timed

SETTINGS = [("fp32", "ieee"), ("fp32", "tf32x3"), ("input", "ieee"), ("input", "tf32x3"), ("input", "tf32")]


def errors(form, shape, settings, scales=(1e-3, 5.0)) -> dict:
    """{setting: largest relative error over outputs, gradients and cases}."""
    B, T, H, D = shape
    worst = {s: 0.0 for s in settings}
    for scale in scales:
        for beta in BETAS:
            leaves, ours, _ = delta_case(form, B, T, H, D, torch.bfloat16, "cuda", scale=scale, seed=1, beta=beta)
            dy = torch.randn(B, T, H, D, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
            per_b = [leaf_grads(ours("torch"), [t[b:b + 1] for t in leaves], dy[b:b + 1], torch.float64) for b in range(B)]
            oracle = [torch.cat(xs) for xs in zip(*per_b)]
            for s in settings:
                os.environ["LCSM_DELTA_T"], os.environ["LCSM_DELTA_SOLVE"] = s
                got = leaf_grads(ours("triton"), leaves, dy, torch.bfloat16)
                bad = not all(bool(torch.isfinite(a).all()) for a in got)
                worst[s] = max(worst[s], float("inf") if bad else max(_rel(a, b) for a, b in zip(got, oracle)))
            del oracle, per_b
            torch.cuda.empty_cache()
    return worst


def cell(ours, fla) -> str:
    """'0.788 ms = 0.94× fla 0.836'; a timer's error text (fla-core refuses some backwards) as it is."""
    if not isinstance(ours, float):
        return str(ours)
    if not isinstance(fla, float):
        return f"{ours:.3f} ms" + ("" if fla is None else f" (fla: {fla})")
    return f"{ours:.3f} ms = {ours / fla:.2f}× fla {fla:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", nargs="+", default=["delta_scalar", "delta"], choices=["delta", "delta_scalar", "delta_vector_k"])
    p.add_argument("--shape", default="8,4096,16,128", help="B,T,H,D of the timings")
    p.add_argument("--check-shape", default="2,4096,8,128", help="B,T,H,D of the accuracy check ('' skips it)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it times the Triton kernels (scripts/delta_forms_ab.py runs on the CPU)")
    shape = tuple(int(x) for x in args.shape.split(","))
    rows = []
    for form in args.forms:
        leaves, ours, fla = delta_case(form, *shape, torch.bfloat16, "cuda")
        ref = {"fla_fwd": timed(lambda: fla(*leaves)), "fla_fwdbwd": timed(fwd_bwd(fla, leaves))} if fla else {}
        acc = errors(form, tuple(int(x) for x in args.check_shape.split(",")), SETTINGS) if args.check_shape else {}
        print(f"{form}: largest relative error per setting: " + ", ".join(f"{t}/{p} {e:.1e}" for (t, p), e in acc.items()),
              flush=True)
        for s in SETTINGS:
            os.environ["LCSM_DELTA_T"], os.environ["LCSM_DELTA_SOLVE"] = s
            row = {"form": form, "T": s[0], "solve": s[1], "fwd": timed(lambda: ours("triton")(*leaves)),
                   "fwdbwd": timed(fwd_bwd(ours("triton"), leaves)), "max_rel_err": acc.get(s), **ref}
            rows.append(row)
            err = "" if row["max_rel_err"] is None else f" | max rel err {row['max_rel_err']:.1e}"
            print(f"{form:<14} T {s[0]:<5} solve {s[1]:<6}: fwd {cell(row['fwd'], ref.get('fla_fwd'))} | "
                  f"fwd+bwd {cell(row['fwdbwd'], ref.get('fla_fwdbwd'))}{err}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
