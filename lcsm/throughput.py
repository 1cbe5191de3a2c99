"""`lcsm bench train`: training throughput (tokens/s) of zoo models resized to one common shape,
side by side in one process: forward, backward and an AdamW step under bf16 autocast on the GPU.

The default shape is the ~125M-parameter setting of the issue tracker: d_model 768, 12 layers,
T = 2048, vocabulary 32000.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lcsm.model import Model
from lcsm.spec import ModelSpec, load_model_spec


def resized(name: str, d_model: int, n_layers: int, n_heads: int, vocab: int) -> ModelSpec:
    """A zoo spec at another size (validated again, so a shape that does not fit is a clear error)."""
    data = load_model_spec(name).model_dump(exclude_unset=True)
    data.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab)
    data.setdefault("mixer", {}).pop("heads", None)
    return ModelSpec.model_validate(data)


def measure(spec: ModelSpec, batch: int, seq: int, steps: int, warmup: int, device) -> dict:
    """Mean time of `steps` optimizer steps after `warmup` steps, synchronised at both ends."""
    torch.manual_seed(0)
    model = Model.from_spec(spec).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    out = {"model": spec.name, "params_M": params / 1e6, "ms_per_step": dt * 1e3,
           "tokens_per_s": batch * seq / dt, "loss": float(loss.detach())}
    if device.type == "cuda":
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["gla", "retnet", "linear_attention", "transformer"],
                   metavar="SPEC", help="zoo names or spec files (default: gla retnet linear_attention transformer)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the results here")


def run(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lcsm bench train needs a CUDA GPU (on the CPU, `lcsm train` reports tokens/s)")
    device = torch.device("cuda")
    env = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(env), flush=True)
    rows = []
    for name in args.models:
        spec = resized(name, args.d_model, args.layers, args.heads, args.vocab)
        try:
            row = measure(spec, args.batch, args.seq, args.steps, args.warmup, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            row = {"model": spec.name, "error": "out of memory"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r.get("model") == "transformer" and "tokens_per_s" in r), None)
    print(f"\n| model | params (M) | ms/step | tokens/s | × transformer |\n|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['model']} | — | {r['error']} | — | — |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
        print(f"| {r['model']} | {r['params_M']:.1f} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcsm bench train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
