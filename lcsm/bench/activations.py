"""`lcsm bench activations`: the activation memory a block keeps for its backward, in bytes per
token, for zoo models at one size: what decides how long a sequence trains in a given memory.

One block (the first of the model: its token mixer and channel mixer, as the trainer runs them)
steps forward under autocast on random inputs [B, T, d]; every tensor autograd saves is counted
once by its storage (torch.autograd.graph.saved_tensors_hooks). Weights and their autocast copies
do not grow with the sequence, so the bench runs two lengths and reports the difference per added
token: exactly the bytes that scale with B·T. Runs on the CPU (then the recurrence takes the torch
path unless `--backend triton` under TRITON_INTERPRET=1, which keeps what the GPU kernels keep) or
on a GPU. `--top N` lists where in lcsm's source the largest kept tensors were made.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections import Counter

import torch

from lcsm.bench import common
from lcsm.bench.common import BenchError, resized
from lcsm.nn.model import Model

DEFAULT_MODELS = ["gla", "retnet", "hgrn2", "mamba2", "gated_deltanet", "transformer"]


def _origin() -> str:
    """file:line of the innermost lcsm frame outside this module (where a saved tensor was made)."""
    for frame in reversed(traceback.extract_stack()):
        if "/lcsm/" in frame.filename and not frame.filename.endswith("bench/activations.py"):
            return f"{frame.filename.rsplit('/lcsm/', 1)[1]}:{frame.lineno}"
    return "torch"


def kept(block: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, where: bool = False):
    """(bytes autograd keeps for block(x)'s backward, {origin: bytes} when `where`)."""
    seen: dict[int, int] = {}
    origins: Counter = Counter()
    held = []  # every saved tensor stays alive until counted, so no two share a storage address

    def pack(t: torch.Tensor):
        held.append(t)
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if where:
                origins[_origin()] += seen[key]
        return t

    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)  # held until counted: a freed graph's storage could be handed to a later tensor
    total = sum(seen.values())
    del out, held
    return total, origins


def measure(spec, batch: int, seq: int, device: torch.device, dtype, backend: str, top: int) -> dict:
    """Bytes kept per token by the spec's first block: (kept at 2·seq - kept at seq) / (batch·seq)."""
    torch.manual_seed(0)
    model = Model(spec).to(device)
    block = model.blocks[0]
    if hasattr(block.mixer, "backend"):
        block.mixer.backend = backend
    d = spec.d_model
    (short, at_short), (long_, at_long) = (
        kept(block, torch.randn(batch, t, d, device=device, requires_grad=True), dtype, where=top > 0)
        for t in (seq, 2 * seq))
    tokens = batch * seq  # the tokens the longer run adds
    row = {"params_M": model.num_parameters() / 1e6, "bytes_per_token": (long_ - short) / tokens,
           "bytes_per_token_per_d": (long_ - short) / tokens / d}
    if top:
        grown = Counter({origin: (b - at_short[origin]) / tokens for origin, b in at_long.items()})
        row["top"] = [(origin, b) for origin, b in grown.most_common(top) if b > 0]
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SPEC",
                   help=f"zoo names or spec files (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256, help="the shorter of the two lengths (the other is twice it)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (default bf16)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="the recurrence's backend (triton on the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--top", type=int, default=0, metavar="N", help="also the N largest origins of kept tensors")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", default=None, metavar="PATH")


def run(args) -> int:
    common.positive(args, "d_model", "heads", "batch", "seq")
    common.non_negative(args, "top")
    if args.json:
        common.check_json_path(args.json)
    if args.device not in (None, "cpu", "cuda"):
        raise BenchError(f"--device: '{args.device}' is not cpu or cuda")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here (use --device cpu)")
    specs = [resized(name, args.d_model, 1, args.heads, 1000) for name in args.models]  # all checked first
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    env = common.environment(device)
    rows = []
    for spec in specs:
        row = {"model": spec.name, **common.guard(lambda: measure(spec, args.batch, args.seq, device, dtype,
                                                                  args.backend, args.top), catch_all=True)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nbytes kept for the backward per token by one block, d_model {args.d_model}, {args.heads} heads, "
          f"{args.dtype}, {device.type}, recurrence backend {args.backend}\n")
    print(common.markdown_table(
        ["model", "bytes / token", "× d_model", "at 32K tokens × 12 blocks"],
        [[r["model"], "—", r.get("error", "—"), "—"] if "bytes_per_token" not in r else
         [r["model"], f"{r['bytes_per_token']:,.0f}", f"{r['bytes_per_token_per_d']:.1f}",
          f"{r['bytes_per_token'] * 32768 * 12 / 2**30:.1f} GiB"] for r in rows]))
    for r in rows:
        if r.get("top"):
            print(f"\n{r['model']}: largest kept tensors by origin (bytes per token)")
            print("\n".join(f"  {b:10,.0f}  {origin}" for origin, b in r["top"]))
    if args.json:
        common.write_json(args.json, {"env": env, "args": common.arguments(args), "rows": rows})
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench activations", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
