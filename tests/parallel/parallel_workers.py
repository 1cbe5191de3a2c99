"""Worker functions for tests/parallel/test_parallel.py, run in spawned processes (gloo, CPU).

Each worker joins a process group, runs its cases and rank 0 writes {case: max error} to a JSON
file; the tests read it. One spawn runs many cases: starting processes costs more than the cases.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-4))  # a gradient that is zero in exact arithmetic (cumsoftmax bias: softmax is shift-invariant) is rounding noise


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _write(rank: int, out: str, results: dict) -> None:
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def mesh_worker(rank: int, world: int, port: int, specs: dict, B: int, T: int, cases: dict, out: str) -> None:
    """The sequence-parallel specs, then the trainer-step cases, in one process group (one start
    of the processes for both): rank 0 writes {"sp": {spec: error}, "steps": {case: error}}."""
    _join(rank, world, port)
    results = {"sp": _sequence_parallel(rank, world, specs, B, T), "steps": _steps(rank, cases)}
    _write(rank, out, results)
    dist.destroy_process_group()


def _sequence_parallel(rank: int, world: int, specs: dict, B: int, T: int) -> dict:
    """For each spec: logits, the balancing loss and every parameter's gradient of a
    sequence-parallel forward and backward (slices of T / world tokens) against one process
    holding the whole sequence."""
    from lcsm.nn.model import Model
    from lcsm.parallel import init_grid, sequence_parallel

    grid = init_grid(sequence=world)
    results = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        model = Model.from_spec(spec).double()
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, spec["vocab_size"], (B, T), generator=gen)
        weight = torch.randn(B, T, spec["vocab_size"], generator=gen, dtype=torch.float64)
        logits = model(tokens)
        aux = model.aux_loss()
        ((logits * weight).sum() + aux).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        with sequence_parallel(grid.context(T // world)):
            local = model(grid.shard(tokens))
            local_aux = model.aux_loss()
            # under SP every rank's balancing loss is that of the whole sequences (lcsm.nn.routing):
            # the ranks' share of it is 1/world, since their gradients are summed below
            ((local * grid.shard(weight)).sum() + local_aux / world).backward()
        err = _rel(local.detach(), grid.shard(logits).detach())
        if torch.is_tensor(aux):
            err = max(err, abs(float(local_aux.detach()) - float(aux.detach())) / abs(float(aux.detach())))
        if os.environ.get("LCSM_DEBUG"):
            print(rank, name, "logits/aux", err, flush=True)
        for n, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)  # rank j's gradient is ∂(Σ_r loss_r)/∂θ_j: the replicas' sum is the total
            err = max(err, _rel(g, ref[n]))
            if os.environ.get("LCSM_DEBUG") and _rel(g, ref[n]) > 1e-9:
                print(rank, name, n, _rel(g, ref[n]), flush=True)
        results[name] = _max_over_ranks(err)
    return results


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (collective) or a plain one."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _steps(rank: int, cases: dict) -> dict:
    """For each case {spec, sequence, strategy, shard, accumulate, grad_clip, precision}: `steps`
    AdamW steps of the trainer (lcsm.run.trainer.Trainer.step) on that mesh against one process
    stepping on the whole batch (accumulate 1): the loss and the gradient norm of every step and
    the parameters at the end, as the largest relative error (fp64). precision bf16 (fp32 models,
    FSDP2's MixedPrecisionPolicy against one process's autocast): the losses only, and the
    sharded master weights must stay fp32."""
    from lcsm.config.recipe import Optimizer, Schedule
    from lcsm.nn.model import Model
    from lcsm.parallel import init_grid
    from lcsm.run.trainer import Trainer

    results = {}
    references = {}  # the one-process steps of a (spec, steps, clip, precision): the same batches and seed
    B, T = 8, 16
    for name, case in cases.items():
        spec, steps = case["spec"], case.get("steps", 3)
        grid = init_grid(sequence=case.get("sequence", 1), strategy=case.get("strategy", "ddp"), shard=case.get("shard"))
        gen = torch.Generator().manual_seed(3)
        batches = []
        for _ in range(steps):
            tokens = torch.randint(0, spec["vocab_size"], (B, T), generator=gen)
            labels = torch.randint(0, spec["vocab_size"], (B, T), generator=gen)
            labels[: B // 2, :5] = -100  # unevenly labelled rows: the mean is over the labelled tokens, globally
            batches.append((tokens, labels))
        # AdamW with eps 1e-6: an update is then a smooth function of the gradient (at 1e-8 a
        # gradient that is zero in exact arithmetic turns its rounding noise into steps of ±lr);
        # a small clip, so that clipping acts on every step
        opt = Optimizer(lr=1e-2, eps=1e-6, grad_clip=case.get("grad_clip"))

        precision = case.get("precision", "fp32")

        def fresh(grid=None, accumulate=1, spec=spec, opt=opt, steps=steps, precision=precision):
            torch.manual_seed(0)
            model = Model.from_spec(spec)
            model = model.double() if precision == "fp32" else model
            return Trainer(model, opt, Schedule(warmup_steps=1), steps, device=torch.device("cpu"), grid=grid,
                           accumulate=accumulate, precision=precision)

        key = json.dumps([spec, steps, case.get("grad_clip"), precision], sort_keys=True)
        if key not in references:
            one = fresh()
            references[key] = one, [one.step(t, l) for t, l in batches]
        one, ref = references[key]
        mesh = fresh(grid, case.get("accumulate", 1))
        got = [mesh.step(t, l) for t, l in batches]
        err = 0.0
        for a, b in zip(got, ref):
            err = max(err, abs(a.loss - b.loss) / abs(b.loss), abs(a.aux_loss - b.aux_loss) / max(abs(b.aux_loss), 1e-12))
            if b.grad_norm is not None:
                err = max(err, abs(a.grad_norm - b.grad_norm) / b.grad_norm)
        if precision == "bf16":
            fp32 = all(p.dtype == torch.float32 for p in mesh.model.parameters())
            results[name] = _max_over_ranks(err if fp32 else float("inf"))
            continue
        start = dict(fresh().model.named_parameters())
        ref_params = dict(one.model.named_parameters())
        for n, p in mesh.model.named_parameters():
            moved, ref_moved = _full(p.detach()) - start[n].detach(), ref_params[n].detach() - start[n].detach()
            e = float((moved - ref_moved).abs().max() / ref_moved.abs().max().clamp_min(1e-6))
            err = max(err, e)  # the distance travelled, not just the weights (which barely move)
            if os.environ.get("LCSM_DEBUG") and e > 1e-9:
                print(rank, name, n, e, flush=True)
        if os.environ.get("LCSM_DEBUG"):
            print(rank, name, [(a.loss, b.loss, a.grad_norm, b.grad_norm) for a, b in zip(got, ref)], flush=True)
        results[name] = _max_over_ranks(err)
    return results


def train_worker(rank: int, world: int, port: int, recipe: dict, kill_at: int | None, resume: bool) -> None:
    """lcsm.run.trainer.train on `world` processes (as torchrun would start them); with kill_at,
    every rank is killed (SIGKILL, no clean-up) right after that step, its checkpoint written."""
    import signal

    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def kill(record):
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train(load_recipe(recipe), resume=resume, quiet=True, on_step=kill if kill_at else None)
    dist.destroy_process_group()
