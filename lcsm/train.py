"""The training loop: a recipe to a run directory.

    RUN/config.yaml                 the resolved recipe (model inlined); `lcsm eval` rebuilds from it
    RUN/metrics.jsonl               one JSON object a line: {"split": "train" | "eval", "step", ...}
    RUN/checkpoint/model.safetensors  the weights (metadata: step)
    RUN/checkpoint/trainer.pt       optimizer, scheduler, step, RNG states, data position
    RUN/eval.json                   the final evaluation
    RUN/tokenizer.json              text tasks with a BPE tokenizer

Batches are a pure function of (seed, step) (lcsm.tasks.epoch_batches), so resuming from a
checkpoint replays exactly the run that was interrupted. Every file is written to a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lcsm.evaluate import autocast, batch_loss, evaluate, resolve_precision
from lcsm.recipe import Recipe, RecipeError
from lcsm.tasks import TaskError, build_task, derive_seed, epoch_batches, steps_per_epoch

ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoint", "eval.json", "tokenizer.json", "curves.png")
# recipe fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("device", "backend", "log_every", "eval_batch_size", "out_dir", "threads", "parallel")


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss); str() is the message for the user."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    total_steps: int
    status: str  # "done", "early_stop" or "interrupted"
    eval: dict | None
    elapsed_s: float
    resumed_from: int = 0


# --------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; a device that is not here is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"device: '{name}' asked for, but CUDA is not available on this machine; use device: cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise RecipeError(f"device: '{name}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RecipeError("device: 'mps' asked for, but MPS is not available on this machine; use device: cpu or auto")
    return torch.device(name)


def _has_run(run_dir: Path) -> bool:
    # a start that failed before its first step leaves at most config.yaml and tokenizer.json:
    # not a run worth protecting
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoint"))


def _clear(run_dir: Path) -> None:
    for name in ARTIFACTS:  # only lcsm's own files: out_dir may hold the user's too
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _checkpoint_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoint" / "trainer.pt"
    if not path.exists():
        return None
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["step"])
    except Exception:
        return None


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """Create or check the run directory. Returns (run_dir, resuming).

    An existing run is never overwritten without overwrite=True; with resume=True it is continued
    from its checkpoint if it has one (and started afresh if it never reached one).
    """
    run_dir = recipe.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out_dir: {run_dir} exists and is not a directory")
    if _has_run(run_dir):
        step = _checkpoint_step(run_dir)
        if overwrite or (resume and step is None):
            _clear(run_dir)
        elif resume:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
            now = recipe.resolved()
            changed = [k for k in _diff(saved or {}, now) if k.split(".")[0] not in RESUMABLE_CHANGES]
            if changed:
                raise RecipeError(
                    f"{run_dir}: the recipe differs from the run's config.yaml ({', '.join(changed[:6])}"
                    f"{', ...' if len(changed) > 6 else ''}); resume with the same recipe, or pass --overwrite to start over"
                )
            return run_dir, True
        else:
            at = f"at step {step}" if step is not None else "without a checkpoint"
            raise RecipeError(
                f"{run_dir} already holds a run ({at}); pass --resume auto to continue it or --overwrite to start over"
            )
    elif run_dir.is_dir():
        _clear(run_dir)  # leftovers of a failed start (a stale tokenizer must not be reused)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"out_dir: cannot create {run_dir} ({e.strerror})") from None
    return run_dir, False


def lr_factor(recipe: Recipe, total: int) -> Callable[[int], float]:
    """The multiplier of optimizer.lr after `step` updates: linear warmup, then cosine to min_lr_ratio."""
    sched = recipe.schedule
    warmup = sched.warmup_steps if sched.warmup_steps is not None else int(0.05 * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sched.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    opt = recipe.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)


# --------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    """model.safetensors, then trainer.pt; both carry the step so a mismatched pair is detected."""
    from safetensors.torch import save_model

    folder = run_dir / "checkpoint"
    folder.mkdir(exist_ok=True)
    step = state["step"]
    _atomic(folder / "model.safetensors", lambda tmp: save_model(model, tmp, metadata={"step": str(step)}))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **state}
    _atomic(folder / "trainer.pt", lambda tmp: torch.save(trainer, tmp))


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_model

    folder = run_dir / "checkpoint"
    weights = folder / "model.safetensors"
    try:
        trainer = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
        with safe_open(str(weights), "pt") as f:
            model_step = int((f.metadata() or {}).get("step", -1))
        load_model(model, str(weights), device=str(device))
    except Exception as e:
        raise RecipeError(f"{folder}: cannot read the checkpoint ({str(e).splitlines()[0]}); pass --overwrite to start over") from None
    if model_step != trainer["step"]:
        raise RecipeError(
            f"{folder}: model.safetensors (step {model_step}) and trainer.pt (step {trainer['step']}) do not match; "
            "the run was stopped while saving; pass --overwrite to start over"
        )
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return trainer


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the checkpoint: the resumed run logs them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    _write_text(path, "".join(line + "\n" for line in keep))


# --------------------------------------------------------------------------- Ctrl-C


class _StopFlag:
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


# --------------------------------------------------------------------------- the loop


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


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    quiet: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run a recipe; returns when the run is done, stopped early or interrupted (Ctrl-C, saved).

    on_step(record) is called after every optimizer step with the step's metrics (tests use it).
    Raises RecipeError for bad input and TrainingError when the loss stops being finite.
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
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        return _run(recipe, device, precision, resume, overwrite, console, quiet, on_step, grid)
    finally:
        torch.set_num_threads(threads)


def _grid(recipe: Recipe):
    """The process grid when the recipe asks for one or torchrun started us (else None)."""
    par = recipe.parallel
    if par.sequence * par.data == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from lcsm.parallel.grid import ParallelError, init_grid

    try:
        # no grid in the recipe but several processes (plain torchrun): data parallel over all of them
        backend = "nccl" if resolve_device(recipe.device).type == "cuda" else "gloo"
        # rank 0 alone evaluates and checkpoints while the others wait in a collective: allow an hour
        grid = init_grid(par.sequence, None if par.sequence * par.data == 1 else par.data, backend=backend, timeout_s=3600)
    except ParallelError as e:
        raise RecipeError(str(e)) from None
    return grid if grid.world > 1 else None


def _on_main(grid, fn):
    """fn() on rank 0 only (files, directories); every rank gets its result or its RecipeError."""
    if grid is None:
        return fn()
    import torch.distributed as dist

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


def _run(recipe: Recipe, device, precision: str, resume: bool, overwrite: bool, console: Console, quiet: bool, on_step,
         grid=None) -> RunResult:
    say = (lambda *a: None) if quiet else console.print
    main = grid is None or grid.is_main  # rank 0 writes the run directory, evaluates and checkpoints
    run_dir, resuming = _on_main(grid, lambda: prepare_run_dir(recipe, resume, overwrite))

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

    from lcsm.model import Model

    torch.manual_seed(derive_seed(recipe.seed, "init"))
    model = Model(recipe.model).set_backend(recipe.backend).to(device)
    model.train()
    if grid is not None:
        from lcsm.parallel.data import sync_gradients, wrap

        model = wrap(model, grid)
    spe = steps_per_epoch(data.train, recipe.batch_size)
    total = recipe.steps or max(1, math.ceil(recipe.epochs * spe))
    eval_every = recipe.eval_every or max(1, total // 10)
    ckpt_every = recipe.checkpoint_every or eval_every
    eval_bs = recipe.eval_batch_size or recipe.batch_size
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, total))
    if not resuming and main:
        _write_text(run_dir / "config.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True))

    step, elapsed, acc = 0, 0.0, {"loss": 0.0, "n": 0, "tokens": 0}
    last_eval, last_ckpt = None, None
    if resuming:
        state = load_checkpoint(run_dir, model, optimizer, scheduler, device)
        step, elapsed, acc = state["step"], state["elapsed_s"], state["log_window"]
        last_eval, last_ckpt = state.get("last_eval"), step
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
        if grid is not None:
            torch.distributed.barrier()
        say(f"resuming {run_dir} at step {step}")
    start_step = step

    def state_at(step: int) -> dict:
        epoch, batch = divmod(step, spe)
        return {
            "step": step,
            "data": {"epoch": epoch, "batch": batch, "steps_per_epoch": spe, "seed": recipe.seed},
            "elapsed_s": elapsed,
            "log_window": dict(acc),
            "last_eval": last_eval,
        }

    def checkpoint():
        nonlocal last_ckpt
        if main:  # replicated weights: rank 0's full state dict loads on any number of processes
            save_checkpoint(run_dir, model, optimizer, scheduler, state_at(step))
        last_ckpt = step

    metrics_file = open(run_dir / "metrics.jsonl", "a") if main else None

    def log(record: dict):
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def run_eval():
        # rank 0 evaluates whole sequences on its own; the others get its metrics
        nonlocal last_eval
        metrics = evaluate(model, data, eval_bs, device, precision) if main else None
        if grid is not None:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        last_eval = {"step": step, **metrics}
        log({"split": "eval", **last_eval})
        return metrics

    n_params = model.num_parameters()
    say(
        f"[bold]{recipe.name or run_dir.name}[/bold]: {recipe.model.name or 'model'} ({n_params / 1e6:.2f}M parameters) "
        f"on {recipe.task.kind}, {total} steps of {recipe.batch_size}, {device.type} {precision} -> {run_dir}"
    )
    status, batches, batches_epoch = "done", None, -1
    stop = _StopFlag()
    progress = _progress(console, quiet)
    try:
        with stop.installed(), progress:
            bar = progress.add_task("train", total=total, completed=step, loss="-", tps="-", lr="-")
            window_start = time.perf_counter()
            while step < total:
                if _agree(grid, stop.requested):
                    status = "interrupted"
                    break
                t0 = time.perf_counter()
                epoch, index = divmod(step, spe)
                if epoch != batches_epoch:
                    batches, batches_epoch = epoch_batches(data.train, recipe.batch_size, recipe.seed, epoch), epoch
                seg_index, rows = batches[index]
                seg = data.train[seg_index]
                x, y = seg.inputs[rows].to(device), seg.labels[rows].to(device)
                if grid is None:
                    with autocast(device, precision):
                        loss = batch_loss(model, x, y)
                        aux = model.aux_loss()
                    value = loss.item()
                else:
                    from lcsm.parallel import sequence_parallel
                    from lcsm.parallel.data import sharded_loss

                    try:
                        ctx = grid.context(grid.shard(x).shape[1])
                    except ValueError as e:
                        raise RecipeError(str(e)) from None
                    with sequence_parallel(ctx), autocast(device, precision):
                        loss, value = sharded_loss(model, x, y, grid)
                        aux = model.aux_loss()
                        aux = aux / grid.world if torch.is_tensor(aux) else aux  # the ranks' aux losses averaged
                if not math.isfinite(value):
                    raise TrainingError(_nonfinite(step + 1, "loss", value, run_dir, last_ckpt))
                aux_value = float(aux.detach()) if torch.is_tensor(aux) else 0.0
                if grid is not None and torch.is_tensor(aux):
                    # the objective holds each rank's aux / world: the sum over ranks is their mean
                    import torch.distributed as dist

                    total_aux = aux.detach().to(torch.float64).reshape(1)
                    dist.all_reduce(total_aux)
                    aux_value = float(total_aux)
                if aux_value:
                    acc["aux_loss"] = acc.get("aux_loss", 0.0) + aux_value
                optimizer.zero_grad(set_to_none=True)
                with sequence_parallel(ctx) if grid is not None else contextlib.nullcontext():
                    (loss + aux).backward()
                if grid is not None:
                    sync_gradients(model)
                if recipe.optimizer.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip).item()
                    if not math.isfinite(norm):
                        raise TrainingError(_nonfinite(step + 1, "gradient norm", norm, run_dir, last_ckpt))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                elapsed += time.perf_counter() - t0
                acc["loss"] += value
                acc["n"] += 1
                acc["tokens"] += x.numel()
                record = {"split": "train", "step": step, "loss": value, "lr": lr}
                if step % recipe.log_every == 0 or step == total:
                    now = time.perf_counter()
                    tps = acc["tokens"] / max(now - window_start, 1e-9)
                    line = {"split": "train", "step": step, "epoch": round(step / spe, 4), "loss": acc["loss"] / acc["n"],
                            "lr": lr, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3)}
                    if "aux_loss" in acc:  # routed models: the load-balancing loss and each router's load
                        line["aux_loss"] = acc["aux_loss"] / acc["n"]
                        line.update({k: round(v, 5) for k, v in model.aux_stats().items()})
                    log(line)
                    progress.update(bar, loss=f"{acc['loss'] / acc['n']:.4f}", tps=f"{tps:,.0f}", lr=f"{lr:.2e}")
                    acc = {"loss": 0.0, "n": 0, "tokens": 0}
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
        if status == "interrupted" and last_ckpt != step:
            checkpoint()
    finally:
        if metrics_file is not None:
            metrics_file.close()
    if status != "interrupted":
        if last_eval is None or last_eval["step"] != step:
            run_eval()
        if last_ckpt != step:
            checkpoint()
        if main:
            _write_text(run_dir / "eval.json", json.dumps(last_eval, indent=2) + "\n")
    return RunResult(run_dir, step, total, status, last_eval, elapsed, start_step)


def _agree(grid, flag: bool) -> bool:
    """True on every rank when any rank's flag is set (Ctrl-C reaches processes one by one)."""
    if grid is None:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _nonfinite(step: int, what: str, value: float, run_dir: Path, last_ckpt: int | None) -> str:
    kept = (
        f"the last good checkpoint (step {last_ckpt}) is kept in {run_dir / 'checkpoint'}"
        if last_ckpt is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"step {step}: the {what} is {value}; training stopped and {kept}. "
        "Try a lower optimizer.lr, a longer schedule.warmup_steps or optimizer.grad_clip, or precision: fp32"
    )
