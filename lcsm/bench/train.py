"""`lcsm bench train`: training throughput (tokens/s) of zoo models resized to one common shape,
side by side in one process: the trainer's one step (forward, backward, fused AdamW) under bf16
autocast on the GPU.

The default shape is a ~125M-parameter setting: d_model 768, 12 layers,
T = 2048, vocabulary 32000.
"""

from __future__ import annotations

import argparse
import json

import torch

from lcsm.bench import common
from lcsm.bench.common import resized
from lcsm.config.recipe import Optimizer, Schedule
from lcsm.config.spec import ModelSpec
from lcsm.nn.model import Model
from lcsm.run.trainer import Trainer

# resized (lcsm/bench/common.py) is re-exported: tests/parallel/test_parallel.py imports it from here
__all__ = ["add_arguments", "main", "measure", "resized", "run"]

# a benchmark times steps, so: a constant learning rate, no warmup, no clipping (one less reduction)
OPTIMIZER = Optimizer(lr=1e-4, grad_clip=None)
SCHEDULE = Schedule(kind="constant", warmup_steps=0)


def measure(spec: ModelSpec, batch: int, seq: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Mean time of `steps` Trainer steps on random tokens [batch, seq] after `warmup` steps."""
    torch.manual_seed(0)
    model = Model(spec).to(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainer = Trainer(model, OPTIMIZER, SCHEDULE, warmup + steps, device=device, precision=precision)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # next-token prediction
    losses = []

    def step():
        losses.append(trainer.step(inputs, labels).loss)

    for _ in range(warmup):
        step()
    common.reset_peak(device)
    ms = common.mean_ms(step, steps, device)
    out = {"model": spec.name, "params_M": model.num_parameters() / 1e6, "ms_per_step": ms,
           "tokens_per_s": batch * seq / (ms / 1e3), "loss": losses[-1]}
    if device.type == "cuda":
        out["peak_GiB"] = common.peak_gib(device)
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
    common.positive(args, "d_model", "layers", "heads", "vocab", "seq", "batch", "steps")
    common.non_negative(args, "warmup")
    if args.json:
        common.check_json_path(args.json)
    specs = [resized(name, args.d_model, args.layers, args.heads, args.vocab) for name in args.models]  # all checked first
    device = common.require_cuda("lcsm bench train", "on the CPU, `lcsm train` reports tokens/s")
    env = common.environment(device)
    print(json.dumps(env), flush=True)
    rows = []
    for spec in specs:
        row = {"model": spec.name, **common.guard(lambda spec=spec: measure(spec, args.batch, args.seq, args.steps, args.warmup, device))}
        rows.append(row)
        print(json.dumps(row), flush=True)
        common.free_cache(device)
    base = next((r for r in rows if r.get("model") == "transformer" and "tokens_per_s" in r), None)
    table = []
    for r in rows:
        if "tokens_per_s" not in r:
            table.append([r["model"], "—", r["error"], "—", "—"])
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
        table.append([r["model"], f"{r['params_M']:.1f}", f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}", ratio])
    print("\n" + common.markdown_table(["model", "params (M)", "ms/step", "tokens/s", "× transformer"], table))
    if args.json:
        common.write_json(args.json, {"env": env, "args": common.arguments(args), "rows": rows})
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
