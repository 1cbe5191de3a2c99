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


def sequence_parallel_worker(rank: int, world: int, port: int, specs: dict, out: str, B: int, T: int) -> None:
    """For each spec: logits, the balancing loss and every parameter's gradient of a
    sequence-parallel forward and backward (slices of T / world tokens) against one process
    holding the whole sequence."""
    from lcsm.nn.model import Model
    from lcsm.parallel import init_grid, sequence_parallel

    _join(rank, world, port)
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
    _write(rank, out, results)
    dist.destroy_process_group()


def data_parallel_worker(rank: int, world: int, port: int, spec: dict, out: str, sequence: int) -> None:
    """One optimizer step of the trainer (lcsm.run.trainer.Trainer.step) on a (sequence × data)
    grid against one process stepping on the whole batch: parameters after the step and the loss."""
    from lcsm.config.recipe import Optimizer, Schedule
    from lcsm.nn.model import Model
    from lcsm.parallel import init_grid
    from lcsm.run.trainer import Trainer

    _join(rank, world, port)
    grid = init_grid(sequence=sequence)
    B, T = 4, 16
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, spec["vocab_size"], (B, T), generator=gen)
    labels = torch.randint(0, spec["vocab_size"], (B, T), generator=gen)
    labels[:, :3] = -100  # unlabelled positions: the mean is over the labelled ones, globally

    def fresh(grid=None):
        torch.manual_seed(0)
        model = Model.from_spec(spec).double()
        # SGD: linear in the gradient, so rounding stays rounding (AdamW's first step is ±lr)
        return Trainer(model, Optimizer(lr=0.1, grad_clip=None), Schedule(kind="constant", warmup_steps=0), 1,
                       device=torch.device("cpu"), grid=grid, optimizer_class=torch.optim.SGD)

    trainer = fresh()
    ref_loss = trainer.step(tokens, labels).loss
    model = trainer.model
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    trainer = fresh(grid)
    model = trainer.model
    loss = trainer.step(tokens, labels).loss
    err = abs(loss - ref_loss) / abs(ref_loss)
    if os.environ.get("LCSM_DEBUG"):
        print(rank, "loss", loss, ref_loss, flush=True)
    # compare the step taken, not just the weights (which barely move)
    start = dict(fresh().model.named_parameters())
    for n, p in model.named_parameters():
        step, ref_step = p.detach() - start[n].detach(), ref[n] - start[n].detach()
        err = max(err, float((step - ref_step).abs().max() / ref_step.abs().max().clamp_min(1e-4)), _rel(p.grad, ref_grad[n]))
        if os.environ.get("LCSM_DEBUG"):
            print(rank, n, _rel(p.grad, ref_grad[n]), flush=True)
    err = _max_over_ranks(err)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"error": err}, f)
    dist.destroy_process_group()


def gradient_presence_worker(rank: int, world: int, port: int, out: str) -> None:
    """sync_gradients: a gradient on one rank only is summed (as zeros elsewhere); a parameter
    that no rank gave a gradient keeps none, as in one process."""
    from lcsm.parallel.data import sync_gradients

    _join(rank, world, port)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
    x = torch.ones(1, 2)
    loss = model["a"](x).sum() + (model["b"](x).sum() if rank == 0 else 0.0)
    loss.backward()
    sync_gradients(model)
    ok = (model["a"].weight.grad is not None and float(model["a"].weight.grad.sum()) == 4.0 * world
          and model["b"].weight.grad is not None and float(model["b"].weight.grad.sum()) == 4.0
          and model["c"].weight.grad is None)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ok": ok}, f)
    dist.destroy_process_group()
