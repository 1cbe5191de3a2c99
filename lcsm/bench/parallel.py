"""`lcsm bench parallel`: sequence parallelism on several GPUs (or CPU processes with --small).

Run under torchrun (or with --nproc N, which starts torchrun itself). Three parts, all ranks together:

1. check: SP = world against one process, for small GLA, GLA+attention (LASP-2H) and Mamba-2
   (short convolutions) models in fp32: logits and every parameter's gradient, max relative error.
2. scaling: training tokens/s per GPU of a ~1B model at the same per-GPU sequence length for the
   grids (sequence 1 × data N) and (sequence N × data 1); efficiency = SP's / DP's tokens/s per GPU.
   Both grids sum gradients over all ranks, so the difference is LASP-2's own cost.
3. longest: with SP = N and activation checkpointing (Model.checkpoint_every = 1), the sequence
   length doubles while the measured peak memory, extrapolated, fits; one full training step
   (fwd + bwd + AdamW, bf16) each.

Every training step is the trainer's one step, Trainer(..., grid=grid).step(tokens, labels) on the
global batch: it takes this rank's shard and runs under the sequence-parallel context; the loss
(Model.forward with labels) never holds [T, vocab] logits.

Prints markdown tables and writes JSON (--json) after every measurement, so a run that is stopped
keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from lcsm.bench import common
from lcsm.bench.common import BenchError, resized
from lcsm.config.recipe import Optimizer, Schedule
from lcsm.config.spec import ModelSpec
from lcsm.nn.model import Model
from lcsm.parallel import init_grid, sequence_parallel
from lcsm.parallel.grid import run_torchrun
from lcsm.run.device import resolve_precision
from lcsm.run.trainer import Trainer

# a benchmark times steps, so: a constant learning rate, no warmup, no clipping (one less reduction)
OPTIMIZER = Optimizer(lr=1e-4, grad_clip=None)
SCHEDULE = Schedule(kind="constant", warmup_steps=0)


def small_spec(name: str, d: int, layers: int, heads: int, vocab: int, pattern: str | None = None) -> ModelSpec:
    spec = resized(name, d, layers, heads, vocab)
    if pattern:
        data = spec.model_dump(exclude_unset=True)
        data.update(mixers={"attn": {"kind": "attention"}}, pattern=pattern)
        spec = common.validated(data, f"{name} with pattern {pattern!r}")
    return spec


def trainer_of(spec: ModelSpec, grid, device, args, total_steps: int) -> Trainer:
    """A model built in place on `device` (a 1B model's init on the CPU takes seconds) and its
    Trainer on `grid` (which broadcasts rank 0's weights)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(spec).set_backend(args.backend)
    return Trainer(model, OPTIMIZER, SCHEDULE, total_steps, device=device, precision=resolve_precision("auto", device),
                   grid=grid)


def random_batch(vocab: int, rows: int, T: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every rank (Trainer.step takes this rank's shard of it): tokens
    and next-token labels, [rows, T] each."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, T + 1), generator=gen, device=device)
    return tokens[:, :-1], tokens[:, 1:]


def _max(x: float, device) -> float:
    """The largest x over the ranks (a time: the slowest rank's; a memory peak: the fullest GPU's)."""
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def check(grid, device, T: int, args) -> list[dict]:
    """SP over all ranks against one process on the whole sequence (fp32): the logits of the
    model's one forward and the gradients of a random weighting of them."""
    rows = []
    cases = [("gla", None), ("gla+attention", "mixer attn"), ("mamba2", None)]
    t = T // grid.world
    for label, pattern in cases:
        name = label.split("+")[0]
        spec = small_spec(name, args.check_d, 4, 4, 1024, pattern)
        torch.manual_seed(0)
        with torch.device(device):  # built in place: a 1B model's init on the CPU takes seconds
            model = Model(spec)
        gen = torch.Generator(device="cpu").manual_seed(1)
        tokens = torch.randint(0, 1024, (1, T), generator=gen).to(device)
        weight = torch.randn(1, T, 1024, generator=gen).to(device)
        logits = model(tokens)
        (logits * weight).sum().backward()
        ref = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        ctx = grid.context(t)
        with sequence_parallel(ctx):
            t0 = ctx.offset
            local = model(tokens[:, t0 : t0 + t])
            (local * weight[:, t0 : t0 + t]).sum().backward()
        err_y = float((local.detach() - logits.detach()[:, t0 : t0 + t]).abs().max() / logits.detach().abs().max())
        err_g = 0.0
        for k, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            err_g = max(err_g, float((g - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-6)))
        row = {"model": label, "seq": T, "sp": grid.world, "logits_rel_err": _max(err_y, device),
               "grad_rel_err": _max(err_g, device)}
        # fp32 Triton dots run in TF32 on the GPU (errors ~1e-3 whichever way the sequence is cut);
        # a wrong prefix or a missing gradient term is O(1)
        row["match"] = "yes" if max(row["logits_rel_err"], row["grad_rel_err"]) < 1e-2 else "NO"
        rows.append(row)
    return rows


def scaling(grids, device, args, spec) -> list[dict]:
    """Trainer steps at --seq tokens per GPU and --batch sequences per GPU on each grid."""
    rows = []
    for label, grid in grids:
        rows.append(scaling_row(label, grid, device, args, spec))
        common.free_cache(device)
    return rows


def scaling_row(label: str, grid, device, args, spec) -> dict:
    trainer = trainer_of(spec, grid, device, args, args.warmup + args.steps)
    T = args.seq  # per GPU
    # the global batch: `batch` rows per data rank, T tokens per sequence rank
    tokens, labels = random_batch(spec.vocab_size, args.batch * grid.data, T * grid.sequence, device)
    for _ in range(args.warmup):
        trainer.step(tokens, labels)
    common.sync(device)
    dist.barrier()
    common.reset_peak(device)
    with common.Stopwatch(device) as clock:
        for _ in range(args.steps):
            result = trainer.step(tokens, labels)
    dt = _max(clock.s / args.steps, device)
    row = {"grid": label, "seq_per_gpu": T, "seq_total": T * grid.sequence, "batch_per_gpu": args.batch,
           "ms_per_step": dt * 1e3, "tokens_per_s_per_gpu": args.batch * T / dt, "loss": result.loss,
           "params_M": trainer.model.num_parameters() / 1e6}
    if device.type == "cuda":
        row["peak_GiB"] = _max(common.peak_gib(device), device)
    return row


def longest(grid, device, args, spec, report) -> list[dict]:
    """Double the total length from --longest-start while the extrapolated peak memory fits: one
    Trainer step (fwd + bwd + AdamW) each, every block recomputed in the backward."""
    trainer = trainer_of(spec, grid, device, args, total_steps=64)
    trainer.model.checkpoint_every = 1  # activation checkpointing: each block keeps only its input
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    # a first short step allocates AdamW's state, so that what grows with T is measured alone
    warm = max(64, args.longest_start // 16 // grid.sequence) * grid.sequence
    trainer.step(*random_batch(spec.vocab_size, 1, warm, device))
    # the trainer keeps a step's gradients until the next backward: free them after each step, so
    # that the memory between steps is the weights and the optimizer state alone
    trainer.optimizer.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())  # the gradients'
    rows, T = [], args.longest_start  # total tokens, split over the ranks
    while T <= args.longest_max:
        tokens, labels = random_batch(spec.vocab_size, 1, T, device, seed=T)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            fixed = torch.cuda.memory_allocated()
            common.reset_peak(device)
        try:
            with common.Stopwatch(device) as clock:
                trainer.step(tokens, labels)
        except torch.OutOfMemoryError:
            # the other ranks may be waiting in a collective: record, then end this process so that
            # torchrun stops the job (the JSON keeps every length measured before)
            rows.append({"seq_total": T, "error": f"out of memory on rank {grid.rank}"})
            report(rows)
            print(f"rank {grid.rank}: out of memory at {T:,} tokens; results so far in {args.json}", flush=True)
            os._exit(3)
        trainer.optimizer.zero_grad(set_to_none=True)
        row = {"seq_total": T, "seq_per_gpu": T // grid.sequence, "step_s": _max(clock.s, device)}
        if device.type == "cuda":
            peak = _max(torch.cuda.max_memory_allocated(), device)
            fixed = _max(max(fixed, torch.cuda.memory_allocated()), device)  # params, optimizer state
            row["peak_GiB"] = peak / 2**30
            # activations grow linearly in T (weights, optimizer state and gradients do not):
            # the next doubling's peak, with 5% to spare
            grows = max(peak - fixed - param_bytes, 0)
            row["next_peak_GiB_predicted"] = (fixed + param_bytes + 2.1 * grows) / 2**30
        rows.append(row)
        report(rows)
        if total_mem is not None and row["next_peak_GiB_predicted"] * 2**30 > 0.95 * total_mem:
            rows.append({"seq_total": 2 * T, "error": f"not run: predicted peak {row['next_peak_GiB_predicted']:.1f} GiB "
                         f"> 95% of {total_mem / 2**30:.0f} GiB"})
            report(rows)
            break
        T *= 2
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    return common.markdown_table(cols, [[fmt(r.get(c, "")) for c in cols] for r in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, help="start torchrun with this many processes on this machine (else run under torchrun)")
    p.add_argument("--small", action="store_true", help="tiny sizes, for the CPU (gloo) or a smoke test")
    p.add_argument("--model", default="gla", help="zoo spec of the scaling and longest parts (default gla)")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=16384, help="tokens per GPU in the scaling part (default 16384)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU in the scaling part")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-seq", type=int, default=8192, help="total tokens of the SP check (default 8192)")
    p.add_argument("--check-d", type=int, default=512)
    p.add_argument("--longest-start", type=int, default=65536, help="first total length of the longest search")
    p.add_argument("--longest-max", type=int, default=1 << 24, help="stop doubling here")
    p.add_argument("--parts", nargs="+", default=["check", "scaling", "longest"], choices=["check", "scaling", "longest"])
    p.add_argument("--backend", default="auto", help="recurrence backend (auto: triton on CUDA)")
    p.add_argument("--json", default="bench-parallel.json", help="results file (default bench-parallel.json)")


def _relaunch(args) -> int:
    """--nproc N outside torchrun: this same command under torchrun with N processes."""
    argv = sys.argv[sys.argv.index("parallel") + 1 :] if "parallel" in sys.argv else sys.argv[1:]
    rest, skip = [], False
    for a in argv:  # the same arguments, less --nproc
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "lcsm.bench.parallel", *rest]
    print("launching:", " ".join(cmd), flush=True)
    return run_torchrun(cmd)


def run(args) -> int:
    common.at_least(args, 2, "nproc")  # one process has no sequence to split
    common.positive(args, "d_model", "layers", "heads", "vocab", "seq", "batch", "steps", "check_seq", "check_d",
                    "longest_start", "longest_max")
    common.non_negative(args, "warmup")
    common.check_json_path(args.json)
    if args.nproc and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    if "WORLD_SIZE" not in os.environ:
        raise BenchError("lcsm bench parallel: run under torchrun, or pass --nproc N (e.g. --nproc 2)")
    if args.small:
        args.d_model, args.layers, args.heads, args.vocab = 64, 2, 2, 256
        args.seq, args.steps, args.warmup = 64, 2, 1
        args.check_seq, args.check_d = 64, 32
        args.longest_start, args.longest_max = 64, 128
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        raise BenchError(f"lcsm bench parallel needs at least 2 processes (WORLD_SIZE is {world})")
    for name in ("check_seq", "longest_start"):  # every rank holds an equal slice of the sequence
        if getattr(args, name) % world:
            raise BenchError(f"{common.flag(name)} {getattr(args, name)} must be a multiple of the number of processes ({world})")
    spec = resized(args.model, args.d_model, args.layers, args.heads, args.vocab)
    sp = init_grid(sequence=world, timeout_s=300)  # a rank that dies must not leave the others waiting long
    dp = init_grid(sequence=1, data=world)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    is_main = sp.rank == 0
    precision = resolve_precision("auto", device)
    out = {"env": common.environment(device, world=world, backend=dist.get_backend()), "args": common.arguments(args)}

    def report(key, rows):
        out[key] = rows
        if is_main:
            common.write_json(args.json, out)

    if "check" in args.parts:
        rows = check(sp, device, args.check_seq, args)
        report("check", rows)
        if is_main:
            print(f"\n## SP = {world} against one process (fp32, {dist.get_backend()})\n")
            print(table(rows, ["model", "seq", "sp", "logits_rel_err", "grad_rel_err", "match"]), flush=True)
    if "scaling" in args.parts:
        rows = scaling([(f"sequence 1 × data {world}", dp), (f"sequence {world} × data 1", sp)], device, args, spec)
        eff = rows[1]["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"]
        out["scaling_efficiency"] = eff
        report("scaling", rows)
        if is_main:
            print(f"\n## {args.model} {rows[0]['params_M']:.0f}M parameters: tokens/s per GPU at {args.seq} tokens per GPU ({precision})\n")
            print(table(rows, ["grid", "seq_per_gpu", "seq_total", "ms_per_step", "tokens_per_s_per_gpu", "peak_GiB"]))
            print(f"\nscaling efficiency (SP {world} / DP {world}, tokens/s per GPU): {eff:.1%}", flush=True)
    if "longest" in args.parts:
        rows = longest(sp, device, args, spec, lambda r: report("longest", r))
        if is_main:
            print(f"\n## longest sequence that trains: {args.model}, SP = {world}, {precision}, activation checkpointing\n")
            print(table(rows, ["seq_total", "seq_per_gpu", "step_s", "peak_GiB", "next_peak_GiB_predicted", "error"]))
            ok = [r["seq_total"] for r in rows if "error" not in r]
            if ok:
                print(f"\nlongest: {max(ok):,} tokens on {world} GPUs", flush=True)
    if is_main:
        print(f"\nwrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench parallel", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
