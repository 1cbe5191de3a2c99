"""The trainer: a recipe to a run directory, through one object that owns the training step.

    Trainer(model, recipe, ...)   .step(tokens, labels)   one optimizer step on a global batch
                                  .evaluate(data)         test metrics (lcsm/run/evaluate.py)
                                  .save() / .load()        the checkpoint (lcsm/run/checkpoint.py)
                                  .fit(data)               the loop: steps, logs, evaluations, checkpoints
    train(recipe, resume=..., overwrite=...)             prepare the run directory, build, fit

Batches are a pure function of (seed, step) (lcsm.tasks.Batches: epoch_batches, or a corpus's
streaming sampler), so resuming from a checkpoint replays exactly the run that was interrupted.
Under a device mesh (data and sequence parallel, DDP or FSDP2, docs/parallel.md) every rank runs
the same step on its shard of the batch; the loss is normalised by the global number of labelled
tokens, so the gradients summed over the ranks are those of one process (lcsm/parallel/data.py:
DDP / FSDP2 average them, the loss is scaled to match). Sharded runs (fsdp, hsdp) checkpoint
through torch.distributed.checkpoint (lcsm/run/dcp.py), the others through lcsm/run/checkpoint.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lcsm.config.base import RecipeError
from lcsm.config.recipe import Optimizer, Recipe, Schedule
from lcsm.nn.model import Model
from lcsm.nn.packing import cu_seqlens_of
from lcsm.parallel import sequence_parallel
from lcsm.parallel.data import clip_grad_norm, gradient_sync, reduction_scale, wrap
from lcsm.parallel.grid import Grid, ParallelError, init_grid
from lcsm.run import dcp
from lcsm.run.checkpoint import (find_weights, init_weights, load_checkpoint, load_weights, save_checkpoint, weights_run_dir,
                                 write_text)
from lcsm.run.device import autocast, resolve_device, resolve_precision
from lcsm.run.evaluate import evaluate, write_eval
from lcsm.run.rundir import RESUMABLE_CHANGES, diff, open_run_dir, record_retune, truncate_metrics
from lcsm.run.sinks import Sinks
from lcsm.run.size import check_recipe_size
from lcsm.tasks import Batches, TaskData, TaskError, build_task, derive_seed

__all__ = ["RESUMABLE_CHANGES", "RunResult", "Trainer", "TrainingError", "diff", "train"]


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss); str() is the message for the user.

    resume_with: recipe overrides ({"optimizer.lr": 0.0033}) with which `--resume auto` can
    continue from the kept checkpoint (the command line builds the command from it), or None."""

    def __init__(self, message: str, resume_with: dict | None = None):
        super().__init__(message)
        self.resume_with = resume_with


@dataclass
class RunResult:
    run_dir: Path
    step: int
    total_steps: int
    status: str  # "done", "early_stop" or "interrupted"
    eval: dict | None
    elapsed_s: float
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)  # what the user should know (a checkpoint fallen back from, ...)


@dataclass
class StepResult:
    loss: float  # the global mean loss of the batch
    aux_loss: float  # the balancing loss (0.0 without routed layers), mean over ranks
    lr: float  # the learning rate the step used
    tokens: int  # tokens of the global batch
    grad_norm: float | None = None  # the global gradient norm before clipping (None without clipping)


# --------------------------------------------------------------------------- optimisation


def lr_factor(schedule: Schedule, total: int) -> Callable[[int], float]:
    """The multiplier of optimizer.lr after `step` updates: linear warmup, then cosine to min_lr_ratio."""
    warmup = schedule.warmup_steps if schedule.warmup_steps is not None else int(0.05 * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, opt: Optimizer, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, not on gains and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------- Ctrl-C


class StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the end of the current step
    (and save); a second one interrupts at once. SIGTERM is how torchrun stops its workers when
    `lcsm train --nproc` gets Ctrl-C, and how schedulers preempt a job."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """The model of one run, its optimizer and schedule, and the one training step.

    model: an lcsm Model (already on `device`); optimizer, schedule: the recipe's sections (AdamW,
    its learning rate and gradient clipping; the warmup and decay); total_steps: the length of the
    schedule; precision: "bf16" (autocast) or "fp32"; grid: the device mesh (None for one
    process); optimizer_class: a torch optimizer in place of AdamW (given the parameters and lr);
    accumulate: micro-batches per optimizer step.

    self.model is the lcsm Model (sharded in place under fsdp / hsdp); self.engine is what runs
    forward and backward (a DistributedDataParallel around the model under ddp, else the model).
    """

    def __init__(self, model: Model, optimizer: Optimizer, schedule: Schedule, total_steps: int, *,
                 device: torch.device, precision: str = "fp32", grid: Grid | None = None, optimizer_class=None,
                 accumulate: int = 1):
        self.model = model
        self.engine = wrap(model, grid, precision, device)
        self.device, self.precision, self.grid = device, precision, grid
        self.grad_clip = optimizer.grad_clip
        self.lr = optimizer.lr
        self.accumulate = accumulate

        def new_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
            if optimizer_class is not None:  # another torch optimizer with the recipe's learning rate (tests: plain SGD)
                return optimizer_class(m.parameters(), lr=optimizer.lr)
            # fused AdamW on plain CUDA tensors; sharded (DTensor) parameters take the foreach path
            return make_optimizer(m, optimizer, fused=device.type == "cuda" and not self.sharded)

        self.new_optimizer = new_optimizer  # (a replicated checkpoint read into a sharded run needs one for a whole copy)
        self.optimizer = new_optimizer(model)  # after wrap: fully_shard has replaced the parameters by shards
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(schedule, total_steps))
        self.total_steps = total_steps
        self.steps_done = 0

    @property
    def is_main(self) -> bool:
        return self.grid is None or self.grid.is_main

    @property
    def sharded(self) -> bool:
        return self.grid is not None and self.grid.sharded

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, step_number: int | None = None,
             starts: torch.Tensor | None = None) -> StepResult:
        """One optimizer step on the global batch tokens, labels [B,T] (every rank passes the same
        batch; each takes its shard), in `accumulate` micro-batches of its rows. starts [B,T] bool:
        where packed documents start (the model restarts there). Raises TrainingError when the
        loss or the gradient norm is not finite (step_number names the step in the message)."""
        grid, model, n_micro = self.grid, self.model, self.accumulate
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        n_tokens = tokens.numel()
        where = step_number if step_number is not None else self.steps_done + 1
        # every rank holds the whole global batch, so it counts the labelled tokens of all of it:
        # that count normalises every micro-batch's sum on every rank, and the ranks' gradients
        # add up to the gradient of the one-process mean (DDP / FSDP2 average: hence the scale)
        count = (labels != -100).sum().clamp_min(1).to(torch.float64)
        scale = reduction_scale(grid)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum and aux of this rank (for the logs)
        self.optimizer.zero_grad(set_to_none=True)
        micro_starts = [None] * n_micro if starts is None else starts.tensor_split(n_micro)
        micro = zip(tokens.tensor_split(n_micro), labels.tensor_split(n_micro), micro_starts)
        for i, (tok, lab, st) in enumerate(micro):
            ctx = None
            if grid is not None:
                try:
                    tok, lab = grid.shard(tok), grid.shard(lab)
                    st = None if st is None else grid.shard(st)
                    ctx = grid.context(tok.shape[1])
                except ValueError as e:
                    raise RecipeError(str(e)) from None
            packed = {} if st is None else {"cu_seqlens": cu_seqlens_of(st.to(self.device))}
            with gradient_sync(self.engine, grid, sync=i == n_micro - 1), sequence_parallel(ctx):
                with autocast(self.device, self.precision):
                    total = self.engine(tok, lab, reduction="sum", **packed)
                    aux = model.aux_loss()
                objective = total * (scale / count).to(total.dtype)
                if torch.is_tensor(aux):
                    # the balancing loss of this rank's tokens (of the whole sequences under SP,
                    # lcsm.nn.routing), averaged over micro-batches and, by the reduction, over ranks
                    objective = objective + aux / n_micro
                    sums[1] += aux.detach().to(torch.float64) / n_micro
                sums[0] += total.detach().to(torch.float64)
                objective.backward()
        if grid is not None:
            dist.all_reduce(sums)  # the logged values only: the gradients are reduced by DDP / FSDP2
        value = float(sums[0] / count)
        aux_value = float(sums[1]) / (grid.world if grid is not None else 1)
        if not math.isfinite(value):
            raise TrainingError(f"step {where}: the loss is {value}")
        norm = None
        if self.grad_clip:
            norm = clip_grad_norm(model.parameters(), self.grad_clip, sharded=self.sharded)
            if not math.isfinite(norm):
                raise TrainingError(f"step {where}: the gradient norm is {norm}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return StepResult(value, aux_value, lr, n_tokens, norm)

    def evaluate(self, data: TaskData, batch_size: int) -> dict:
        """Test metrics on whole sequences: rank 0 evaluates on its own and the others get its
        metrics; sharded weights need every rank's shard, so then all ranks run the same batches."""
        run = self.is_main or self.sharded
        metrics = evaluate(self.model, data, batch_size, self.device, self.precision) if run else None
        if self.grid is not None:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def save(self, run_dir: Path, state: dict, keep: int = 2) -> None:
        """Sharded weights: every rank writes its shards (DCP; the previous checkpoint kept too when
        keep >= 2). Replicated: rank 0 writes the checkpoint (its state loads on any number of
        processes) and keeps the newest `keep`."""
        state = {"step": self.steps_done, **state}
        if self.sharded:
            dcp.save(run_dir, self.model, self.optimizer, self.scheduler, state, self.grid.strategy, keep=keep)
        elif self.is_main:
            save_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, state, keep=keep)
            dcp.remove(run_dir)  # a sharded checkpoint of an earlier part of the run is now stale

    def load(self, run_dir: Path, log: Callable[[str], None] | None = None) -> dict:
        """Resume from RUN/checkpoint, whichever format it has and whatever mesh wrote it: the
        newest readable replicated checkpoint (an unreadable newer one is reported through log),
        or the sharded one when it is the newer; returns the trainer state saved with it."""
        if dcp.newest_is_sharded(run_dir):
            state = dcp.load(run_dir, self.model, self.optimizer, self.scheduler, log=log, set_aside=True)
        elif self.sharded:  # a replicated checkpoint (one process, ddp) resumed with sharded weights: read whole, then shard
            whole = Model(self.model.spec)
            whole_optimizer = self.new_optimizer(whole)
            state = load_checkpoint(run_dir, whole, whole_optimizer, self.scheduler, torch.device("cpu"), log=log,
                                    set_aside=self.is_main)
            dcp.copy_full(whole, whole_optimizer, self.model, self.optimizer)
        else:
            state = load_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, self.device, log=log,
                                    set_aside=self.is_main)
        self.steps_done = state["step"]
        # the schedule is this trainer's: a resume with another optimizer.lr or warmup (allowed
        # after a non-finite loss) goes on from the saved step at the new rate; with the same
        # recipe this recomputes exactly the rate that was saved
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return state

    # ------------------------------------------------------------------ the loop

    def fit(self, recipe: Recipe, data: TaskData, run_dir: Path, resuming: bool, *, console: Console, quiet: bool,
            on_step: Callable[[dict], None] | None = None, note: Callable[[str], None] | None = None) -> RunResult:
        """Train to the end of the schedule (or an early stop, or Ctrl-C), logging, evaluating and
        checkpointing as the recipe says; evaluates and checkpoints the last step. note(text)
        receives what the user should know even when quiet (plain text, no markup)."""
        say = (lambda *a: None) if quiet else console.print
        notes: list[str] = []

        def tell(text: str) -> None:
            notes.append(text)
            (note or (lambda t: say(escape(t))))(text)

        grid = self.grid
        batches = Batches(data, recipe.batch_size, recipe.seed)
        spe = batches.steps_per_epoch
        total = self.total_steps
        eval_every = recipe.eval_every or max(1, total // 10)
        ckpt_every = recipe.checkpoint_every or eval_every
        eval_bs = recipe.eval_batch_size or recipe.batch_size

        elapsed, window = 0.0, {"loss": 0.0, "n": 0, "tokens": 0}
        last_eval, last_ckpt = None, None
        if resuming:
            state = self.load(run_dir, log=tell)
            elapsed, window = state["elapsed_s"], state["log_window"]
            last_eval, last_ckpt = state.get("last_eval"), self.steps_done
            if self.is_main:
                truncate_metrics(run_dir / "metrics.jsonl", self.steps_done, log=tell)
                record_retune(run_dir, recipe, log=tell)
            if grid is not None:
                dist.barrier()
            say(f"resuming {escape(str(run_dir))} at step {self.steps_done}")
        start_step = self.steps_done

        def checkpoint():
            nonlocal last_ckpt
            epoch, batch = divmod(self.steps_done, spe)
            self.save(run_dir, {
                "data": {"epoch": epoch, "batch": batch, "steps_per_epoch": spe, "seed": recipe.seed},
                "elapsed_s": elapsed, "log_window": dict(window), "last_eval": last_eval,
            }, keep=recipe.keep_checkpoints)
            last_ckpt = self.steps_done

        # metrics.jsonl, and TensorBoard / wandb when the recipe's `log` names them (lcsm/run/sinks.py)
        sinks = Sinks(run_dir, recipe.log, run_name=recipe.name or run_dir.name, config=recipe.resolved(),
                      resume_step=self.steps_done if resuming else None, enabled=self.is_main, say=tell)
        log = sinks.write

        def run_eval() -> dict:
            nonlocal last_eval
            metrics = self.evaluate(data, eval_bs)
            last_eval = {"step": self.steps_done, **metrics}
            log({"split": "eval", **last_eval})
            return metrics

        say(
            f"[bold]{escape(recipe.name or run_dir.name)}[/bold]: {escape(recipe.model.name or 'model')} "
            f"({self.model.num_parameters() / 1e6:.2f}M parameters) on {recipe.task.kind}, {total} steps of "
            f"{recipe.batch_size}, {self.device.type} {self.precision} -> {escape(str(run_dir))}"
        )
        status = "done"
        stop = StopFlag()
        progress = _progress(console, quiet)
        try:
            with stop.installed(), progress:
                bar = progress.add_task("train", total=total, completed=self.steps_done, loss="-", tps="-", lr="-")
                window_start = time.perf_counter()
                while self.steps_done < total:
                    if _agree(grid, stop.requested):
                        status = "interrupted"
                        break
                    t0 = time.perf_counter()
                    try:
                        batch = batches.at(self.steps_done)
                    except TaskError as e:  # a shard that went bad under the run: stop, the checkpoint stays
                        raise RecipeError(f"task: {e}; {_kept(run_dir, last_ckpt)}") from None
                    try:
                        result = self.step(batch.tokens, batch.labels, starts=batch.starts)
                    except TrainingError as e:
                        lower = {"optimizer.lr": float(f"{recipe.optimizer.lr / 3:.2g}")}
                        raise TrainingError(_nonfinite(str(e), run_dir, last_ckpt, lower), resume_with=lower) from None
                    step = self.steps_done
                    elapsed += time.perf_counter() - t0
                    window["loss"] += result.loss
                    window["n"] += 1
                    window["tokens"] += result.tokens
                    if result.aux_loss:
                        window["aux_loss"] = window.get("aux_loss", 0.0) + result.aux_loss
                    record = {"split": "train", "step": step, "loss": result.loss, "lr": result.lr}
                    if step % recipe.log_every == 0 or step == total:
                        now = time.perf_counter()
                        tps = window["tokens"] / max(now - window_start, 1e-9)
                        line = {"split": "train", "step": step, "epoch": round(step / spe, 4),
                                "loss": window["loss"] / window["n"], "lr": result.lr, "tokens_per_s": round(tps, 1),
                                "elapsed_s": round(elapsed, 3)}
                        if "aux_loss" in window:  # routed models: the balancing loss and each router's load
                            line["aux_loss"] = window["aux_loss"] / window["n"]
                            line.update({k: round(v, 5) for k, v in self.model.aux_stats().items()})
                        log(line)
                        progress.update(bar, loss=f"{window['loss'] / window['n']:.4f}", tps=f"{tps:,.0f}", lr=f"{result.lr:.2e}")
                        window = {"loss": 0.0, "n": 0, "tokens": 0}
                        window_start = now
                    progress.update(bar, completed=step)
                    if step % eval_every == 0 or step == total:
                        metrics = run_eval()
                        if not quiet:
                            progress.console.print(_eval_line(step, metrics))
                        if recipe.early_stop is not None and metrics.get("accuracy", 0.0) >= recipe.early_stop:
                            status = "early_stop"
                    if step % ckpt_every == 0 or step == total or status == "early_stop":
                        checkpoint()
                    if on_step is not None:
                        on_step(record)
                    if status == "early_stop":
                        break
            if status == "interrupted" and last_ckpt != self.steps_done:
                checkpoint()
        finally:
            sinks.close()
        if status != "interrupted":
            if last_eval is None or last_eval["step"] != self.steps_done:
                run_eval()
            if last_ckpt != self.steps_done:
                checkpoint()
            if self.is_main:
                metrics = {k: v for k, v in last_eval.items() if k != "step"}
                write_eval(run_dir / "eval.json", last_eval["step"], metrics, recipe.resolved()["task"], "lcsm train")
        return RunResult(run_dir, self.steps_done, total, status, last_eval, elapsed, start_step, notes)


# --------------------------------------------------------------------------- train()


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    retune: bool = False,
    console: Console | None = None,
    quiet: bool = False,
    on_step: Callable[[dict], None] | None = None,
    init_from: str | Path | None = None,
) -> RunResult:
    """Run a recipe; returns when the run is done, stopped early or interrupted (Ctrl-C, saved).

    The run directory is locked while it runs (a second process gets a RecipeError naming this
    one). retune: a resume may change optimizer.lr, optimizer.grad_clip and schedule.warmup_steps
    (`lcsm train --resume auto` allows it; ablation points do not). on_step(record) is called after
    every optimizer step with the step's metrics (tests use it). init_from: a run directory,
    checkpoint folder or model.safetensors whose weights a new run starts from (a fresh optimizer
    and schedule at step 0; its tokenizer.json comes along); a run being resumed ignores it. A run
    directory holding an init checkpoint (checkpoint/init/, lcsm upcycle's) and no step checkpoint
    starts from it with resume=True as well. Raises RecipeError for bad input and TrainingError
    when the loss stops being finite.
    """
    console = console or Console(highlight=False)
    grid = _grid(recipe)
    if grid is not None and not grid.is_main:
        quiet = True
    device = resolve_device(recipe.device)
    if grid is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # one GPU per process (LOCAL_RANK)
    precision = resolve_precision(recipe.precision, device)
    if recipe.backend == "triton" and device.type != "cuda":
        raise RecipeError(f"backend: 'triton' needs a CUDA device (device is {device}); use backend: auto or torch")
    compiled = recipe.compile
    problem = compiled and grid is not None and compiled.problem_with(grid.world)  # several ranks: torchrun, --nproc
    if problem:
        raise RecipeError(f"compile: {problem}")
    check_recipe_size(recipe, device)  # absurd sizes fail here, before anything is allocated
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    held = None
    try:
        say = (lambda *a: None) if quiet else console.print
        notes: list[str] = []

        def note(text: str) -> None:  # shown (escaped: paths may hold [brackets]) and kept in the result
            notes.append(text)
            say(escape(text))

        init = _init_source(recipe, init_from, overwrite)

        def prepare():
            run_dir, resuming, held = open_run_dir(recipe, resume, overwrite, retune=retune, init=init is not None, log=note)
            try:
                if resuming and init is not None:
                    note(f"{run_dir} has a checkpoint: resuming it (--init-from is for a run's start)")
                # a start from weights: --init-from's, or with --resume auto the run's own init checkpoint
                start = None if resuming else (init or (init_weights(run_dir) if resume else None))
                if start is not None:
                    _copy_tokenizer(start, run_dir)
            except BaseException:
                held.release()
                raise
            return run_dir, resuming, held, start

        run_dir, resuming, held, init = _on_main(grid, prepare)

        def task():
            try:
                return build_task(recipe.task, recipe.seed, run_dir=run_dir, log=say)
            except TaskError as e:
                raise RecipeError(f"task: {e}") from None

        data = None

        def first():
            nonlocal data
            data = task()

        # rank 0 first: a text task may train and save a tokenizer in the run directory
        _on_main(grid, first)
        if data is None:
            data = task()

        torch.manual_seed(derive_seed(recipe.seed, "init"))
        model = Model(recipe.model).set_backend(recipe.backend).to(device)
        if init is not None:
            step = load_weights(model, init, device)
            say(f"starting from the weights of {escape(str(init))}" + (f" (step {step})" if step >= 0 else "") + " with a fresh optimizer")
        model.train()
        if recipe.checkpointing is not None:
            model.checkpoint_every = recipe.checkpointing.every
        if compiled is not None:
            if compiled.graphs and device.type != "cuda":
                note(f"compile.mode '{compiled.mode}': CUDA graphs need a CUDA device; on {device.type} the blocks compile without them")
            model.compile_blocks(**compiled.options())
        try:
            spe = Batches(data, recipe.batch_size, recipe.seed).steps_per_epoch
        except TaskError as e:
            raise RecipeError(f"task: {e}") from None
        total = recipe.steps or max(1, math.ceil(recipe.epochs * spe))
        warmup = recipe.schedule.warmup_steps
        if warmup is not None and warmup > total:  # (recipes in steps are checked when they load)
            raise RecipeError(f"schedule.warmup_steps: {warmup} warmup steps exceed the run's {total} steps "
                              f"({recipe.epochs} epochs of {spe}); use at most {total}")
        trainer = Trainer(model, recipe.optimizer, recipe.schedule, total, device=device, precision=precision, grid=grid,
                          accumulate=recipe.accumulate)
        if not resuming and trainer.is_main:
            write_text(run_dir / "config.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True))
        result = trainer.fit(recipe, data, run_dir, resuming, console=console, quiet=quiet, on_step=on_step, note=note)
        result.notes = notes  # (note() kept the trainer's notes too)
        return result
    finally:
        if held is not None:
            held.release()  # (a no-op on the ranks that got a copy of rank 0's lock)
        torch.set_num_threads(threads)


def _init_source(recipe: Recipe, init_from, overwrite: bool) -> Path | None:
    """The weights file --init-from names (checked before the run directory is touched)."""
    if init_from is None:
        return None
    weights, _ = find_weights(init_from)
    if overwrite and weights.resolve().is_relative_to(recipe.run_dir.resolve()):
        raise RecipeError(f"--init-from {init_from}: these weights are in the run directory that --overwrite would clear; "
                          "leave out --overwrite (an upcycled directory starts from its weights as it is)")
    return weights


def _copy_tokenizer(weights: Path, run_dir: Path) -> None:
    """A BPE run's token ids belong to its tokenizer: the new run takes the source run's tokenizer.json."""
    source = weights_run_dir(weights)
    if source is None or not (source / "tokenizer.json").exists() or source.resolve() == run_dir.resolve():
        return
    write_text(run_dir / "tokenizer.json", (source / "tokenizer.json").read_text())  # (claimed: rundir.FRESH)


def _grid(recipe: Recipe) -> Grid | None:
    """The device mesh when the recipe asks for one or torchrun started us (else None)."""
    par = recipe.parallel
    if par.sequence * par.data == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    try:
        # no grid in the recipe but several processes (plain torchrun): data parallel over all of them
        backend = "nccl" if resolve_device(recipe.device).type == "cuda" else "gloo"
        # rank 0 alone evaluates and checkpoints while the others wait in a collective: allow an hour
        grid = init_grid(par.sequence, None if par.sequence * par.data == 1 else par.data, backend=backend, timeout_s=3600,
                         strategy=par.strategy, shard=par.shard)
    except ParallelError as e:
        raise RecipeError(str(e)) from None
    return grid if grid.world > 1 else None


def _on_main(grid, fn):
    """fn() on rank 0 only (files, directories); every rank gets its result or its RecipeError."""
    if grid is None:
        return fn()
    box = [None, None]
    if grid.is_main:
        try:
            box[0] = fn()
        except (RecipeError, TaskError) as e:
            box[1] = str(e)
        except Exception as e:  # any failure here must reach every rank, or they wait until the timeout
            box[1] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RecipeError(box[1])
    return box[0]


def _agree(grid, flag: bool) -> bool:
    """True on every rank when any rank's flag is set (Ctrl-C reaches processes one by one)."""
    if grid is None:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("step {task.completed:>6.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("lr {task.fields[lr]}"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


def _eval_line(step: int, metrics: dict) -> str:
    parts = [f"step {step}", f"eval loss {metrics['loss']:.4f}"]
    if "bits_per_byte" in metrics:
        parts += [f"ppl {metrics['perplexity']:.2f}", f"bpb {metrics['bits_per_byte']:.3f}"]
    else:
        parts.append(f"accuracy {metrics['accuracy']:.3f}")
        if len(metrics["slices"]) > 1:
            parts.append("(" + ", ".join(f"{n}: {s['accuracy']:.3f}" for n, s in metrics["slices"].items()) + ")")
    return "  ".join(parts)


def _kept(run_dir: Path, last_ckpt: int | None) -> str:
    return (
        f"the last good checkpoint (step {last_ckpt}) is kept in {run_dir / 'checkpoint' / f'step-{last_ckpt:06d}'}"
        if last_ckpt is not None
        else "no checkpoint had been written yet"
    )


def _nonfinite(what: str, run_dir: Path, last_ckpt: int | None, lower: dict) -> str:
    kept = _kept(run_dir, last_ckpt)
    sets = " ".join(f"--set {k}={v}" for k, v in lower.items())
    return (
        f"{what}; training stopped and {kept}. "
        f"Try a lower optimizer.lr (--resume auto {sets} continues {'from it' if last_ckpt is not None else 'the run'}), "
        "a longer schedule.warmup_steps, a smaller optimizer.grad_clip, or precision: fp32"
    )
