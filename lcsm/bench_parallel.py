"""`lcsm bench parallel`: sequence parallelism on several GPUs (or CPU processes with --small).

Run under torchrun (or with --nproc N, which starts torchrun itself). Three parts, all ranks together:

1. check: SP = world against one process, for small GLA, GLA+attention (LASP-2H) and Mamba-2
   (short convolutions) models in fp32: logits and every parameter's gradient, max relative error.
2. scaling: training tokens/s per GPU of a ~1B model at the same per-GPU sequence length for the
   grids (sequence 1 × data N) and (sequence N × data 1); efficiency = SP's / DP's tokens/s per GPU.
   Both grids sum gradients over all ranks, so the difference is LASP-2's own cost.
3. longest: with SP = N and activation checkpointing, the sequence length doubles while the
   measured peak memory, extrapolated, fits; one full training step (fwd + bwd + AdamW, bf16) each.

Prints markdown tables and writes JSON (--json) after every measurement, so a run that is stopped
keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lcsm.model import Model
from lcsm.parallel import init_grid, sequence_parallel
from lcsm.parallel.grid import run_torchrun
from lcsm.parallel.data import sync_gradients, wrap
from lcsm.spec import ModelSpec
from lcsm.throughput import resized


def small_spec(name: str, d: int, layers: int, heads: int, vocab: int, pattern: str | None = None) -> ModelSpec:
    spec = resized(name, d, layers, heads, vocab)
    if pattern:
        data = spec.model_dump(exclude_unset=True)
        data.update(mixers={"attn": {"kind": "attention"}}, pattern=pattern)
        spec = ModelSpec.model_validate(data)
    return spec


def checkpointed(model: Model) -> Model:
    """Recompute each block in the backward (its input is all that is kept)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(
            lambda fwd, x, lower_bound=None: checkpoint(fwd, x, lower_bound, use_reentrant=False), block.forward
        )
    return model


def chunked_loss(model: Model, h: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Σ cross-entropy over [B,T] without holding [B,T,vocab] logits (each chunk recomputed)."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, yc):
        return F.cross_entropy(model.lm_head(model.norm(hc)).float().flatten(0, 1), yc.flatten(), reduction="sum")

    total = 0.0
    for hc, yc in zip(h.split(chunk, dim=1), labels.split(chunk, dim=1)):
        total = total + checkpoint(part, hc, yc, use_reentrant=False)
    return total


def hidden(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    x = model.embed(tokens)
    for block, bound in zip(model.blocks, model.layer_bounds()):
        x = block(x, lower_bound=bound)
    return x


def train_step(model, opt, tokens, labels, grid, device, precision_bf16: bool) -> float:
    """tokens, labels: this rank's [B, T_local]; the loss is normalised by the global token count."""
    ctx = grid.context(tokens.shape[1])
    n = tokens.numel() * grid.world
    with sequence_parallel(ctx):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision_bf16):
            loss = chunked_loss(model, hidden(model, tokens), labels) / n
        loss.backward()
    sync_gradients(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(grid, device, T: int, args) -> list[dict]:
    """SP over all ranks against one process on the whole sequence (fp32)."""
    rows = []
    cases = [("gla", None), ("gla+attention", "mixer attn"), ("mamba2", None)]
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
        ctx = grid.context(T // grid.world)
        with sequence_parallel(ctx):
            t0 = ctx.offset
            local = model(tokens[:, t0 : t0 + T // grid.world])
            (local * weight[:, t0 : t0 + T // grid.world]).sum().backward()
        err_y = float((local.detach() - logits.detach()[:, t0 : t0 + T // grid.world]).abs().max() / logits.detach().abs().max())
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
        del model
    return rows


def scaling(grids, device, args, spec) -> list[dict]:
    rows = []
    for label, grid in grids:
        torch.manual_seed(0)
        with torch.device(device):
            model = wrap(Model(spec).set_backend(args.backend), grid)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        T = args.seq  # per GPU
        gen = torch.Generator().manual_seed(grid.dp_rank)
        tokens = torch.randint(0, spec.vocab_size, (args.batch, T * grid.sequence + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        t = T
        x, y = x[:, grid.sp_rank * t : (grid.sp_rank + 1) * t].to(device), y[:, grid.sp_rank * t : (grid.sp_rank + 1) * t].to(device)
        for _ in range(args.warmup):
            train_step(model, opt, x, y, grid, device, device.type == "cuda")
        _sync(device)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(model, opt, x, y, grid, device, device.type == "cuda")
        _sync(device)
        dt = _max((time.perf_counter() - t0) / args.steps, device)
        row = {"grid": label, "seq_per_gpu": T, "seq_total": T * grid.sequence, "batch_per_gpu": args.batch,
               "ms_per_step": dt * 1e3, "tokens_per_s_per_gpu": args.batch * T / dt, "loss": loss,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        if device.type == "cuda":
            row["peak_GiB"] = _max(torch.cuda.max_memory_allocated() / 2**30, device)
        rows.append(row)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def longest(grid, device, args, spec, report) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(device):
        model = checkpointed(wrap(Model(spec).set_backend(args.backend), grid))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    # a first short step allocates AdamW's state, so that what grows with T is measured alone
    warm = max(grid.sequence * 64, args.longest_start // 16)
    x = torch.randint(0, spec.vocab_size, (1, warm // grid.sequence), device=device)
    train_step(model, opt, x, x, grid, device, device.type == "cuda")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the gradients'
    rows, T = [], args.longest_start  # total tokens, split over the ranks
    while T <= args.longest_max:
        t = T // grid.sequence
        x = torch.randint(0, spec.vocab_size, (1, t), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            fixed = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        try:
            train_step(model, opt, x, x, grid, device, device.type == "cuda")
            _sync(device)
        except torch.OutOfMemoryError:
            # the other ranks may be waiting in a collective: record, then end this process so that
            # torchrun stops the job (the JSON keeps every length measured before)
            rows.append({"seq_total": T, "error": f"out of memory on rank {grid.rank}"})
            report(rows)
            print(f"rank {grid.rank}: out of memory at {T:,} tokens; results so far in {args.json}", flush=True)
            os._exit(3)
        row = {"seq_total": T, "seq_per_gpu": t, "step_s": _max(time.perf_counter() - t0, device)}
        if device.type == "cuda":
            peak = _max(torch.cuda.max_memory_allocated(), device)
            fixed = _max(max(fixed, torch.cuda.memory_allocated()), device)  # params, grads, optimizer state
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
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _check_arguments(args) -> None:
    from lcsm.spec import SpecError

    positive = {"--nproc": args.nproc, "--d-model": args.d_model, "--layers": args.layers, "--heads": args.heads,
                "--vocab": args.vocab, "--seq": args.seq, "--batch": args.batch, "--steps": args.steps,
                "--check-seq": args.check_seq, "--check-d": args.check_d, "--longest-start": args.longest_start,
                "--longest-max": args.longest_max}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise SpecError(f"lcsm bench parallel {flag}: must be at least 1 (got {value})")
    if args.warmup < 0:
        raise SpecError(f"lcsm bench parallel --warmup: must be at least 0 (got {args.warmup})")


def run(args) -> int:
    _check_arguments(args)
    if args.nproc and "LOCAL_RANK" not in os.environ:
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
        cleaned = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "lcsm.bench_parallel", *rest]
        print("launching:", " ".join(cleaned), flush=True)
        return run_torchrun(cleaned)
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("lcsm bench parallel: run under torchrun, or pass --nproc N (e.g. --nproc 2)")
    if args.small:
        args.d_model, args.layers, args.heads, args.vocab = 64, 2, 2, 256
        args.seq, args.steps, args.warmup = 64, 2, 1
        args.check_seq, args.check_d = 64, 32
        args.longest_start, args.longest_max = 64, 128
    world = int(os.environ["WORLD_SIZE"])
    sp = init_grid(sequence=world, timeout_s=300)  # a rank that dies must not leave the others waiting long
    dp = init_grid(sequence=1, data=world)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    main = sp.rank == 0
    out = {"env": {"date": time.strftime("%Y-%m-%d"), "world": world, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "backend": dist.get_backend()}, "args": {k: v for k, v in vars(args).items() if k != "func"}}

    def report(key, rows):
        out[key] = rows
        if main:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    spec = resized(args.model, args.d_model, args.layers, args.heads, args.vocab)
    if "check" in args.parts:
        rows = check(sp, device, args.check_seq, args)
        report("check", rows)
        if main:
            print(f"\n## SP = {world} against one process (fp32, {dist.get_backend()})\n")
            print(table(rows, ["model", "seq", "sp", "logits_rel_err", "grad_rel_err", "match"]), flush=True)
    if "scaling" in args.parts:
        rows = scaling([(f"sequence 1 × data {world}", dp), (f"sequence {world} × data 1", sp)], device, args, spec)
        eff = rows[1]["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"]
        out["scaling_efficiency"] = eff
        report("scaling", rows)
        if main:
            print(f"\n## {args.model} {rows[0]['params_M']:.0f}M parameters: tokens/s per GPU at {args.seq} tokens per GPU ({'bf16' if device.type == 'cuda' else 'fp32'})\n")
            print(table(rows, ["grid", "seq_per_gpu", "seq_total", "ms_per_step", "tokens_per_s_per_gpu", "peak_GiB"]))
            print(f"\nscaling efficiency (SP {world} / DP {world}, tokens/s per GPU): {eff:.1%}", flush=True)
    if "longest" in args.parts:
        rows = longest(sp, device, args, spec, lambda r: report("longest", r))
        if main:
            print(f"\n## longest sequence that trains: {args.model}, SP = {world}, {'bf16' if device.type == 'cuda' else 'fp32'}, activation checkpointing\n")
            print(table(rows, ["seq_total", "seq_per_gpu", "step_s", "peak_GiB", "next_peak_GiB_predicted", "error"]))
            ok = [r["seq_total"] for r in rows if "error" not in r]
            if ok:
                print(f"\nlongest: {max(ok):,} tokens on {world} GPUs", flush=True)
    if main:
        print(f"\nwrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcsm bench parallel", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
