"""`lcsm ablate`: the points of ablation recipes (lcsm/config/ablation.py) trained, resumably and in parallel.

A grid recipe is a base training recipe plus axes:

    name: mqar_tau
    base: {model: ..., task: ..., steps: 600}        # a train recipe: inline, or a path / shipped name
    grid:
      model.d_model: [64, 128]                       # a dotted recipe key -> its values
      setting:                                       # a named axis: each value a label and overrides
        - {label: 64x4, set: {task.train: [...], task.test: [...]}}
      optimizer.lr: [1.0e-3, 3.0e-3]
    best_of: {key: optimizer.lr, metric: accuracy, mode: max}
    seeds: [0]
    plot: {x: model.d_model, panel: setting}
    reduced: {grid: {model.d_model: [64, 128]}}     # what --reduced changes

Every point (the product of the axes and the seeds) is validated as a Recipe before anything runs.
The ablation directory holds:

    DIR/ablation.json       the grid recipe as run and every point (id, labels, overrides)
    DIR/runs/<point id>/    an ordinary lcsm run directory (config.yaml, metrics.jsonl, checkpoint/, eval.json)
                            plus point.json: the outcome (status, error, elapsed_s, resumed_from)
    DIR/results.csv         one row per point: axes, seed, status, metrics
    DIR/results.md          the table: best_of applied, mean ± std over seeds
    DIR/failures.json       the points that failed, with their errors
    DIR/<metric>.png        the plot

A point whose run directory has eval.json is finished and skipped; an interrupted one resumes from
its checkpoint; a failed one is retried on the next invocation. The ablation directory is locked
while `run` uses it (DIR/.lcsm.lock: a second `lcsm ablate` on it stops with an error naming the
first), and worker processes stop when the process that started them dies. See docs/ablations.md.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.markup import escape

from lcsm.config.ablation import GridRecipe, Point, expand, load_grid, narrow, parse_axis
from lcsm.config.base import RecipeError, SpecError
from lcsm.config.recipe import load_recipe, parse_override
from lcsm.run import files, lock
from lcsm.run.checkpoint import atomic_write, write_text
from lcsm.run.evaluate import read_eval
from lcsm.run.rundir import read_config
from lcsm.run.trainer import RESUMABLE_CHANGES, diff, train

# --------------------------------------------------------------------------- running one point


def stale_keys(run_dir: Path, recipe: dict) -> list[str]:
    """The recipe fields in which a finished run's config.yaml differs from `recipe` (fields that
    may change on resume, and the run's name, do not count): a point finished under other settings,
    e.g. with --reduced or another --set, must not pass for this one."""
    try:
        saved = read_config(run_dir)
    except SpecError:
        return []
    ignore = {*RESUMABLE_CHANGES, "name"}
    return [k for k in diff(saved or {}, recipe) if k.split(".")[0] not in ignore]


def point_status(run_dir: Path, recipe: dict | None = None) -> str:
    """done (a readable eval.json), stale (done, but under a recipe other than `recipe`), failed
    (point.json says so), started (a run without eval.json) or pending."""
    if read_eval(run_dir / "eval.json") is not None:
        return "stale" if recipe is not None and stale_keys(run_dir, recipe) else "done"
    info = read_json(run_dir / "point.json")
    if info and info.get("status") == "failed":
        return "failed"
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoint").exists():
        return "started"
    return "pending"


def read_metric(ev: dict, name: str) -> float | None:
    """A metric of an evaluation's metrics (EvalRecord.metrics) by dotted name, or None."""
    cur: Any = ev
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) else None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_point_json(run_dir: Path, info: dict) -> None:
    files.claim(run_dir, "point.json")
    write_json(run_dir / "point.json", info)


def run_point(recipe_data: dict, on_step: Callable | None = None) -> dict:
    """Train one point (resuming it if it was interrupted); never raises for a failed run.
    Returns and writes RUN/point.json: {status, step, total_steps, elapsed_s, resumed_from, error, notes}."""
    run_dir = Path(recipe_data["out_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    # the outcome of the last attempt: this one's replaces it (the ablation's runs/ folder is lcsm's)
    (run_dir / "point.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        recipe = load_recipe(recipe_data)
        result = train(recipe, resume=True, quiet=True, on_step=on_step)
        info = {
            "status": result.status,
            "step": result.step,
            "total_steps": result.total_steps,
            "elapsed_s": round(result.elapsed_s, 3),
            "resumed_from": result.resumed_from,
            "error": None,
            **({"notes": result.notes} if result.notes else {}),
        }
    except Exception as e:  # a failed point is recorded and the grid goes on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        info = {"status": "failed", "error": f"{type(e).__name__}: {first}"[:1000], "traceback": traceback.format_exc()[-4000:]}
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    write_point_json(run_dir, info)
    return info


def die_with_parent(parent: int, grace_s: float = 10.0) -> None:
    """Make this (worker) process stop when `parent` dies, however it dies (SIGKILL included).

    Linux: prctl(PR_SET_PDEATHSIG, SIGTERM), delivered by the kernel the moment the parent goes.
    Everywhere (macOS, and as a second line on Linux): a thread that sees the parent pid change
    (the orphan is re-parented) and sends SIGTERM. A worker inside train() then finishes its step
    and saves a checkpoint, as after Ctrl-C; after grace_s it exits regardless."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watch thread below still does it

    def watch():
        while os.getppid() == parent:
            time.sleep(0.25)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            time.sleep(grace_s)
            os._exit(1)

    threading.Thread(target=watch, name="lcsm-parent-watch", daemon=True).start()


def _worker(wid: int, threads: int, tasks, results, stop, parent: int | None = None) -> None:
    """A worker process: takes (index, recipe data) from `tasks` until None or stop is set."""
    import queue

    if parent is not None:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # train() installs its own handler while it runs
    import torch

    torch.set_num_threads(threads)
    while not stop.is_set():
        try:
            item = tasks.get(timeout=0.2)
        except queue.Empty:
            continue
        if item is None:
            break
        index, data = item
        results.put(("start", wid, index, None))
        info = run_point(data)
        results.put(("done", wid, index, info))
        if info["status"] == "interrupted":
            break


# --------------------------------------------------------------------------- the grid


@dataclass
class Ablation:
    """A grid recipe expanded into its directory and points."""

    grid: GridRecipe
    out_dir: Path
    points: list[Point]
    sets: list[tuple[str, Any]] = field(default_factory=list)  # base overrides (--reduced, --set)
    reduced: bool = False

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid = self.grid
        plots = [f"{grid.report_metric}.png"]
        if grid.slices:
            plots.append(f"{grid.slices.metric or grid.report_metric}_by_{grid.slices.by}.png")
        if grid.fit:
            plots.append("fit.png")
        files.claim(self.out_dir, "ablation.json", "runs", "results.csv", "results.md", "failures.json", *plots)
        data = {
            "grid": self.grid.model_dump(mode="json", exclude_none=True),
            "reduced": self.reduced,
            "set": [[k, v] for k, v in self.sets],
            "points": [{"id": p.id, "labels": p.labels, "values": p.values, "seed": p.seed, "run_dir": str(p.run_dir)} for p in self.points],
        }
        write_json(self.out_dir / "ablation.json", data)


def prepare(
    recipe: str | Path | dict,
    out: str | Path | None = None,
    sets: list[str] = (),
    axes: list[str] = (),
    seeds: list[int] | None = None,
    reduced: bool = False,
) -> Ablation:
    """Load a grid recipe, apply --reduced, --grid AXIS=VALUES, --seeds and --set KEY=VALUE (overrides of
    the base recipe, after the reduced ones) and expand it, validating every point.
    The ablation directory is OUT/<name> (OUT defaults to ./ablations)."""
    grid, folder = load_grid(recipe)
    written = grid
    pairs: list[tuple[str, Any]] = []
    if reduced:
        if grid.reduced is None:
            raise RecipeError(f"{grid.name}: --reduced, but the recipe has no reduced: section")
        pairs += list(grid.reduced.set.items())
        grid = narrow(grid, grid.reduced.grid, grid.reduced.seeds)
    for text in sets:
        keys, value = parse_override(text)
        pairs.append((".".join(keys), value))
    if axes or seeds is not None:
        grid = narrow(grid, dict(parse_axis(t) for t in axes), seeds, source=written)
    out_dir = Path(out or "ablations") / (grid.name or "ablation")
    return Ablation(grid, out_dir, expand(grid, folder, out_dir, pairs), pairs, reduced)


def workers_for(jobs: int) -> list[str | None]:
    """One entry per worker: the CUDA device it sees (jobs per GPU), or None per CPU worker."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return [None] * jobs
    return [str(d) for d in range(n) for _ in range(jobs)]


def run(
    ablations: list[Ablation],
    jobs: int = 1,
    console=None,
    on_step: Callable | None = None,
) -> dict[str, int]:
    """Run every unfinished point of the ablations; returns counts {done, failed, skipped, interrupted}.

    One worker (in this process) when there is one device and jobs = 1; else a spawned worker
    process per (GPU, job) with CUDA_VISIBLE_DEVICES set to its GPU (or `jobs` CPU workers).
    on_step reaches train() in the in-process case (tests)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    held = []
    try:
        for ab in ablations:  # one `lcsm ablate` at a time in an ablation directory
            ab.out_dir.mkdir(parents=True, exist_ok=True)
            held.append(lock.acquire(ab.out_dir, "ablation directory", lambda text: console.print(escape(text))))
        return _run(ablations, jobs, console, on_step)
    finally:
        for h in held:
            h.release()


def _run(ablations: list[Ablation], jobs: int, console, on_step: Callable | None) -> dict[str, int]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    for ab in ablations:
        ab.save()
    # identical points (the base variant appears in several recipes) are trained once: the
    # others get its results copied in (point.json says from where)
    counts = {"done": 0, "failed": 0, "skipped": 0, "interrupted": 0, "copied": 0}
    finished: dict[str, Point] = {}
    todo, twins = [], {}
    stale = [(ab, p) for ab in ablations for p in ab.points if point_status(p.run_dir, p.recipe) == "stale"]
    if stale:
        ab, p = stale[0]
        raise RecipeError(
            f"{len(stale)} finished point(s) were trained under another recipe, e.g. {p.run_dir} "
            f"({', '.join(stale_keys(p.run_dir, p.recipe)[:5])} differ); run into another --out, or remove them"
        )
    for ab in ablations:
        for p in ab.points:
            if point_status(p.run_dir) == "done":
                counts["skipped"] += 1
                finished.setdefault(_twin_key(p.recipe), p)
    for ab in ablations:
        for p in ab.points:
            key = _twin_key(p.recipe)
            if point_status(p.run_dir) == "done":
                continue
            if key in finished:
                _copy_twin(finished[key], p, {"status": "done"})
                counts["copied"] += 1
            elif key in twins:
                twins[key].append((ab, p))
            else:
                twins[key] = []
                todo.append((ab, p))
    total = sum(len(ab.points) for ab in ablations)
    devices = workers_for(jobs)
    waiting = sum(map(len, twins.values()))
    console.print(
        f"{total} points in {len(ablations)} ablation(s); {counts['skipped']} finished before"
        + (f", {counts['copied']} copied from identical finished points" if counts["copied"] else "")
        + f"; {len(todo)} to run" + (f" (and {waiting} identical to one of them, copied after)" if waiting else "")
        + f" on {len(devices)} worker(s)" + (f" ({len(set(devices))} GPU(s) × {jobs})" if devices[0] is not None else " (CPU)")
    )

    progress = Progress(
        TextColumn("[bold]ablate"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    bar = progress.add_task("points", total=total, completed=counts["skipped"] + counts["copied"], state="")

    def state() -> str:
        return f"{counts['done']} done, {counts['failed']} failed" + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")

    def report(ab: Ablation, p: Point, info: dict, twin_of: Point | None = None) -> None:
        status = info["status"]
        if status != "interrupted":
            for tab, tp in twins.get(_twin_key(p.recipe), []) if twin_of is None else []:
                report(tab, tp, _copy_twin(p, tp, info), twin_of=p)
                progress.update(bar, advance=1)
        if status == "failed":
            counts["failed"] += 1
            console.print(f"[red]failed[/red] {escape(f'{ab.grid.name}/{p.id}')}: {escape(str(info['error']))}", soft_wrap=True)
            return
        if status == "interrupted":
            counts["interrupted"] += 1
            return
        counts["done" if twin_of is None else "copied"] += 1
        ev = read_eval(p.run_dir / "eval.json")
        metric = ab.grid.report_metric
        value = read_metric(ev.metrics, metric) if ev is not None else None
        how = f"copied from {twin_of.run_dir}" if twin_of else f"{info['wall_s']:.1f}s"
        resumed = f" (resumed at step {info['resumed_from']})" if info.get("resumed_from") else ""
        shown = f"{value:.4f}" if value is not None else "-"
        console.print(f"[green]done[/green] {escape(f'{ab.grid.name}/{p.id}: {metric} {shown}, {how}{resumed}')}", soft_wrap=True)
        for text in info.get("notes") or []:
            console.print(f"  {escape(text)}", soft_wrap=True)

    # longest first: language models and long sequences, so the last workers do not idle on one
    todo.sort(key=lambda t: -_cost(t[1].recipe))
    with progress:
        if len(devices) == 1:
            for ab, p in todo:
                info = run_point(p.recipe, on_step=on_step)
                report(ab, p, info)
                progress.update(bar, advance=info["status"] != "interrupted", state=state())
                if info["status"] == "interrupted":
                    break
        else:
            _run_pool(todo, devices, report, lambda: progress.update(bar, advance=1, state=state()), console)
    return counts


def _twin_key(recipe: dict) -> str:
    return json.dumps({k: v for k, v in recipe.items() if k not in ("name", "out_dir")}, sort_keys=True)


def _copy_twin(src: Point, dst: Point, info: dict) -> dict:
    """Give dst (a point identical to src) src's results: eval.json and metrics.jsonl, its own config.yaml."""
    dst.run_dir.mkdir(parents=True, exist_ok=True)
    files.claim(dst.run_dir, "metrics.jsonl", "eval.json", "config.yaml", "point.json")
    if info["status"] == "failed":
        out = {"status": "failed", "error": f"identical to {src.run_dir}, which failed: {info['error']}", "wall_s": 0.0}
    else:
        for name in ("metrics.jsonl", "eval.json"):  # eval.json last: it marks the point finished
            if (src.run_dir / name).exists():
                data = (src.run_dir / name).read_bytes()
                atomic_write(dst.run_dir / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        write_text(dst.run_dir / "config.yaml", yaml.safe_dump(dst.recipe, sort_keys=False, allow_unicode=True))
        src_info = read_json(src.run_dir / "point.json") or {}
        out = {**src_info, "status": src_info.get("status", "done"), "copied_from": str(src.run_dir), "wall_s": 0.0}
    write_point_json(dst.run_dir, out)
    return out


def _cost(recipe: dict) -> float:
    """A rough relative cost of a point, to start the long ones first."""
    task = recipe.get("task", {})
    seq = task.get("seq_len") or max((s.get("seq_len", 0) for s in task.get("train", [])), default=64)
    return (recipe.get("steps") or 1000) * recipe.get("batch_size", 64) * seq * recipe["model"].get("d_model", 64)


def _run_pool(todo, devices, report, advance, console) -> None:
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    tasks, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    # after Ctrl-C the queue still holds the unstarted points: this process must not wait at exit
    # to push them into a pipe nobody reads
    tasks.cancel_join_thread()
    for index, (_, p) in enumerate(todo):
        tasks.put((index, p.recipe))
    for _ in devices:
        tasks.put(None)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs, running = {}, {}
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")

    def start(wid: int, device: str | None):
        # spawn copies the environment at start: each worker sees one GPU as cuda:0
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        proc = ctx.Process(target=_worker, args=(wid, threads, tasks, results, stop, os.getpid()), daemon=True)
        proc.start()
        procs[wid] = (proc, device)
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved

    for wid, device in enumerate(devices):
        start(wid, device)
    finished, next_wid, interrupted = 0, len(devices), False
    try:
        while finished < len(todo) and procs:
            try:
                kind, wid, index, info = results.get(timeout=1.0)
            except queue.Empty:
                for wid, (proc, device) in list(procs.items()):
                    if not proc.is_alive():
                        del procs[wid]
                        if wid in running:  # died mid-point (killed for memory, a crash): record it, replace it
                            index = running.pop(wid)
                            ab, p = todo[index]
                            info = {"status": "failed", "error": f"worker process died (exit code {proc.exitcode})", "wall_s": 0.0}
                            write_point_json(p.run_dir, info)
                            report(ab, p, info)
                            advance()
                            finished += 1
                            if not stop.is_set():
                                start(next_wid, device)
                                next_wid += 1
                        elif proc.exitcode != 0 and not stop.is_set():  # crashed between points: replace it
                            start(next_wid, device)
                            next_wid += 1
                continue
            if kind == "start":
                running[wid] = index
                continue
            running.pop(wid, None)
            ab, p = todo[index]
            report(ab, p, info)
            if info["status"] != "interrupted":
                advance()
            finished += 1
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        console.print("stopping: each worker saves its point's checkpoint (Ctrl-C reached them too)")
        deadline = time.time() + 60
        while running and time.time() < deadline:
            try:
                kind, wid, index, info = results.get(timeout=1.0)
            except queue.Empty:
                if not any(proc.is_alive() for proc, _ in procs.values()):
                    break
                continue
            if kind == "done":
                running.pop(wid, None)
                report(*todo[index], info)
    finally:
        stop.set()
        for proc, _ in procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    if interrupted:
        raise KeyboardInterrupt


