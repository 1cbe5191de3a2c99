"""`lcsm ablate`: grid recipes, expanded into training runs, run (resumably, in parallel) and reported.

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
its checkpoint; a failed one is retried on the next invocation. See docs/ablations.md.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lcsm.recipe import (
    RecipeError,
    _find_file,
    apply_override,
    load_recipe,
    resolve_shipped_path,
    shipped_recipes,
    resolve_model,
    resolve_task,
)
from lcsm.spec import Base, FieldError, SpecError, format_errors, load_yaml
from lcsm.train import RESUMABLE_CHANGES, _diff

METRICS = ("loss", "accuracy", "token_accuracy", "bits_per_byte", "perplexity")
LOWER_IS_BETTER = ("loss", "bits_per_byte", "perplexity")


# --------------------------------------------------------------------------- the grid recipe


class Variant(Base):
    """One value of a named axis: a label and the dotted overrides it stands for."""

    label: str = Field(min_length=1)
    set: dict[str, Any] = Field(description="dotted recipe key -> value, applied in order")


class BestOf(Base):
    """Select over one axis (typically optimizer.lr) by a metric of the final evaluation."""

    key: str = Field(description="a grid axis")
    metric: str = Field("accuracy", description="a key of eval.json: accuracy, loss, bits_per_byte, ...")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for loss, bits_per_byte, perplexity; else max")

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric in LOWER_IS_BETTER else "max")


class PlotSpec(Base):
    """The report's figure: the metric against a numeric axis (one line per remaining combination),
    or (no x) bars per combination; one panel per value of `panel`."""

    x: str | None = Field(None, description="a grid axis with numeric values")
    panel: str | None = Field(None, description="a grid axis: one panel per value")


class Reduced(Base):
    """What --reduced changes: a smaller grid for a short GPU budget."""

    description: str | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of the base recipe")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axes replaced (named axes: labels kept)")
    seeds: list[int] | None = None


class GridRecipe(Base):
    name: str | None = Field(None, description="default: the file's name")
    description: str | None = None
    base: str | dict = Field(description="a training recipe: a path, a shipped name (recipes/train) or a mapping")
    grid: dict[str, list[Any]] = Field(description="axis -> values (dotted keys) or variants {label, set}")
    best_of: BestOf | None = None
    metric: str | None = Field(None, description="the reported metric; default best_of.metric, else accuracy")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    plot: PlotSpec = Field(default_factory=PlotSpec)
    reduced: Reduced | None = None

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid):
        if not grid:
            raise ValueError("give at least one axis")
        for axis, values in grid.items():
            if not values:
                raise FieldError(axis, "an axis needs at least one value")
            named = [_is_variant(v) for v in values]
            if any(named) and not all(named):
                raise FieldError(axis, "mix of variants ({label, set}) and plain values; use one or the other")
            if all(named):
                for n, v in enumerate(values):
                    try:
                        Variant.model_validate(v)
                    except ValidationError as e:
                        raise FieldError((axis, n), "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
            elif not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", axis):
                raise FieldError(axis, "a plain axis is a dotted recipe key (e.g. optimizer.lr)")
            labels = [_label(v) for v in values]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise FieldError(axis, f"repeated value(s) {', '.join(dup)}")
            if axis == "seed":
                raise FieldError(axis, "seeds are given by seeds:, not as an axis")
        return grid

    @model_validator(mode="after")
    def _references(self):
        if self.best_of and self.best_of.key not in self.grid:
            raise FieldError(("best_of", "key"), f"'{self.best_of.key}' is not a grid axis ({', '.join(self.grid)})")
        for f in ("x", "panel"):
            axis = getattr(self.plot, f)
            if axis is not None and axis not in self.grid:
                raise FieldError(("plot", f), f"'{axis}' is not a grid axis ({', '.join(self.grid)})")
        if self.plot.x is not None and not all(_number(v) is not None for v in self.grid[self.plot.x]):
            raise FieldError(("plot", "x"), f"the values of '{self.plot.x}' are not all numbers")
        if len(set(self.seeds)) != len(self.seeds):
            raise FieldError("seeds", "repeated seed")
        return self

    @property
    def report_metric(self) -> str:
        return self.metric or (self.best_of.metric if self.best_of else "accuracy")

    @property
    def report_mode(self) -> str:
        if self.best_of and self.best_of.metric == self.report_metric:
            return self.best_of.resolved_mode
        return "min" if self.report_metric in LOWER_IS_BETTER else "max"


def _is_variant(value) -> bool:
    return isinstance(value, dict) and "label" in value


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _label(value) -> str:
    """The short name of an axis value: a variant's label, a number in %g, else flow YAML."""
    if _is_variant(value):
        return str(value["label"])
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


# --------------------------------------------------------------------------- points


@dataclass
class Point:
    """One training run of the grid."""

    id: str
    labels: dict[str, str]  # axis -> label of its value
    values: dict[str, Any]  # axis -> the value (a variant's overrides for named axes)
    seed: int
    run_dir: Path
    recipe: dict = field(repr=False)  # the resolved, validated recipe data


def shipped_ablations() -> dict[str, Path]:
    return shipped_recipes("ablations")


def load_grid(recipe: str | Path | dict) -> tuple[GridRecipe, Path | None]:
    """(the validated GridRecipe, the folder its relative paths are found from)."""
    node, folder, name = None, None, None
    if isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), "<ablation>"
    else:
        path = resolve_shipped_path(recipe, "ablations", "ablation")
        data, node = load_yaml(path)
        source, folder, name = str(path), path.parent, path.stem
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: an ablation recipe is a mapping of fields (got {type(data).__name__})")
    if name and not data.get("name"):
        data["name"] = name
    try:
        return GridRecipe.model_validate(data), folder
    except ValidationError as err:
        raise RecipeError(format_errors(err, data, source, node)) from None


def _base_data(base: str | dict, folder: Path | None) -> dict:
    """The base training recipe as plain data with its model and task inlined, so that grid keys
    such as model.d_model act on spec fields whatever form the base gave the model in."""
    if isinstance(base, str):
        path = shipped_recipes().get(base) or _find_file(base, folder)
        data, _ = load_yaml(path)
        if not isinstance(data, dict):
            raise RecipeError(f"base: {base} is not a training recipe (a mapping of fields)")
        folder = path.parent
    else:
        data = copy.deepcopy(base)
    if "model" in data:
        data["model"] = resolve_model(data["model"], folder, "base.model")
    if "task" in data:
        data["task"] = resolve_task(data["task"], folder, "base.task")
    task = data.get("task")
    if isinstance(task, dict) and task.get("kind") == "text":
        corpus = task.get("corpus", "pydoc")
        if isinstance(corpus, str) and corpus != "pydoc":
            task["corpus"] = str(_find_file(corpus, folder).resolve())
    return data


def _apply(data: dict, key: str, value: Any, where: str) -> None:
    keys = key.split(".")
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"{where}: '{key}' is not a dotted recipe key")
    apply_override(data, keys, copy.deepcopy(value), f"{key}={value!r}", None)
    if keys in (["steps"], ["epochs"]):  # a run length replaces the other one, as with lcsm train --set
        data.pop("epochs" if keys == ["steps"] else "steps", None)


def narrow(grid: GridRecipe, axes: dict[str, list], seeds: list[int] | None) -> GridRecipe:
    """A copy of the grid with some axes replaced (a named axis keeps the variants whose labels are
    listed, in that order) and other seeds."""
    data = grid.model_dump(mode="json", exclude_none=True)
    for axis, values in axes.items():
        if axis not in grid.grid:
            raise RecipeError(f"--grid {axis}: not an axis of {grid.name} ({', '.join(grid.grid)})")
        old = grid.grid[axis]
        if _is_variant(old[0]):
            by_label = {v["label"]: v for v in old}
            missing = [str(v) for v in values if str(v) not in by_label]
            if missing:
                raise RecipeError(f"--grid {axis}: no variant labelled {', '.join(missing)} (labels: {', '.join(by_label)})")
            data["grid"][axis] = [by_label[str(v)] for v in values]
        else:
            data["grid"][axis] = list(values)
    if seeds is not None:
        data["seeds"] = list(seeds)
    try:
        return GridRecipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, data, f"{grid.name} (narrowed)")) from None


def expand(grid: GridRecipe, folder: Path | None, out_dir: Path, sets: list[tuple[str, Any]] = ()) -> list[Point]:
    """Every point of the grid (axes in order, then seeds), each validated as a Recipe.
    Raises RecipeError naming the point's axes and values when one is invalid."""
    base = _base_data(grid.base, folder)
    touched = {k for axis, values in grid.grid.items() for v in values for k in (v["set"] if _is_variant(v) else [axis])}
    for key, _ in sets:
        clash = sorted(t for t in touched if t == key or t.startswith(key + ".") or key.startswith(t + "."))
        if clash:
            raise RecipeError(f"--set {key}: the grid sets {', '.join(clash)} at every point; change the axis instead (--grid AXIS=VALUES)")
    for key, value in sets:
        _apply(base, key, value, f"--set {key}")
    axes = list(grid.grid)
    short = {a: a.split(".")[-1] for a in axes}
    if len(set(short.values())) < len(axes):
        short = {a: a for a in axes}
    points = []
    for combo in itertools.product(*(grid.grid[a] for a in axes)):
        for seed in grid.seeds:
            labels = {a: _label(v) for a, v in zip(axes, combo)}
            pid = "__".join(f"{_slug(short[a])}={_slug(labels[a])}" for a in axes) + f"__seed={seed}"
            where = ", ".join(f"{a}={labels[a]}" for a in axes) + f", seed={seed}"
            data = copy.deepcopy(base)
            try:
                for axis, value in zip(axes, combo):
                    if _is_variant(value):
                        for key, v in value["set"].items():
                            _apply(data, key, v, f"grid.{axis}[{value['label']}]")
                    else:
                        _apply(data, axis, value, f"grid.{axis}")
                data["seed"] = seed
                data["name"] = f"{grid.name}/{pid}"
                data["out_dir"] = str(out_dir / "runs" / pid)
                recipe = load_recipe(data)
            except SpecError as e:
                raise RecipeError(f"{grid.name}: point {where}: {e}") from None
            points.append(Point(pid, labels, dict(zip(axes, combo)), seed, recipe.run_dir, recipe.resolved()))
    seen: dict[str, Point] = {}
    for p in points:  # two labels can spell the same directory name: they must not share a run
        if p.id in seen:
            a, b = seen[p.id].labels, p.labels
            raise RecipeError(f"{grid.name}: the points {a} and {b} get the same run directory '{p.id}'; "
                              "give their variants labels that differ in letters or digits")
        seen[p.id] = p
    return points


# --------------------------------------------------------------------------- running one point


def stale_keys(run_dir: Path, recipe: dict) -> list[str]:
    """The recipe fields in which a finished run's config.yaml differs from `recipe` (fields that
    may change on resume, and the run's name, do not count): a point finished under other settings,
    e.g. with --reduced or another --set, must not pass for this one."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    ignore = {*RESUMABLE_CHANGES, "name"}
    return [k for k in _diff(saved or {}, recipe) if k.split(".")[0] not in ignore]


def point_status(run_dir: Path, recipe: dict | None = None) -> str:
    """done (eval.json), stale (done, but under a recipe other than `recipe`), failed (point.json
    says so), started (a run without eval.json) or pending."""
    if (run_dir / "eval.json").exists():
        return "stale" if recipe is not None and stale_keys(run_dir, recipe) else "done"
    info = _read_json(run_dir / "point.json")
    if info and info.get("status") == "failed":
        return "failed"
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoint").exists():
        return "started"
    return "pending"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_point(recipe_data: dict, on_step: Callable | None = None) -> dict:
    """Train one point (resuming it if it was interrupted); never raises for a failed run.
    Returns and writes RUN/point.json: {status, step, total_steps, elapsed_s, resumed_from, error}."""
    from lcsm.train import train

    run_dir = Path(recipe_data["out_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
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
        }
    except Exception as e:  # a failed point is recorded and the grid goes on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        info = {"status": "failed", "error": f"{type(e).__name__}: {first}"[:1000], "traceback": traceback.format_exc()[-4000:]}
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    _write_json(run_dir / "point.json", info)
    return info


def _worker(wid: int, threads: int, tasks, results, stop) -> None:
    """A worker process: takes (index, recipe data) from `tasks` until None or stop is set."""
    import queue
    import signal

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
        data = {
            "grid": self.grid.model_dump(mode="json", exclude_none=True),
            "reduced": self.reduced,
            "set": [[k, v] for k, v in self.sets],
            "points": [{"id": p.id, "labels": p.labels, "values": p.values, "seed": p.seed, "run_dir": str(p.run_dir)} for p in self.points],
        }
        _write_json(self.out_dir / "ablation.json", data)


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
    from lcsm.recipe import parse_override

    grid, folder = load_grid(recipe)
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
        grid = narrow(grid, dict(_parse_axis(t) for t in axes), seeds)
    out_dir = Path(out or "ablations") / (grid.name or "ablation")
    return Ablation(grid, out_dir, expand(grid, folder, out_dir, pairs), pairs, reduced)


def _parse_axis(text: str) -> tuple[str, list]:
    """'model.d_model=[64,128]' -> ('model.d_model', [64, 128]); a single value is a list of one."""
    from lcsm.recipe import parse_override

    if "=" not in text:
        raise RecipeError(f"--grid {text}: expected AXIS=[V1,V2,...], e.g. --grid model.d_model=[64,128]")
    axis, _, rest = text.partition("=")
    _, value = parse_override("x=" + rest)
    values = value if isinstance(value, list) else [value]
    values = [float(v) if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v for v in values]
    return axis.strip(), values


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(highlight=False)
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
            console.print(f"[red]failed[/red] {ab.grid.name}/{p.id}: {info['error']}", soft_wrap=True)
            return
        if status == "interrupted":
            counts["interrupted"] += 1
            return
        counts["done" if twin_of is None else "copied"] += 1
        ev = _read_json(p.run_dir / "eval.json") or {}
        metric = ab.grid.report_metric
        value = _metric(ev, metric)
        how = f"copied from {twin_of.run_dir}" if twin_of else f"{info['wall_s']:.1f}s"
        resumed = f" (resumed at step {info['resumed_from']})" if info.get("resumed_from") else ""
        shown = f"{value:.4f}" if value is not None else "-"
        console.print(f"[green]done[/green] {ab.grid.name}/{p.id}: {metric} {shown}, {how}{resumed}", soft_wrap=True)

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
    if info["status"] == "failed":
        out = {"status": "failed", "error": f"identical to {src.run_dir}, which failed: {info['error']}", "wall_s": 0.0}
    else:
        for name in ("metrics.jsonl", "eval.json"):  # eval.json last: it marks the point finished
            if (src.run_dir / name).exists():
                tmp = dst.run_dir / (name + ".tmp")
                tmp.write_bytes((src.run_dir / name).read_bytes())
                os.replace(tmp, dst.run_dir / name)
        (dst.run_dir / "config.yaml").write_text(yaml.safe_dump(dst.recipe, sort_keys=False, allow_unicode=True))
        src_info = _read_json(src.run_dir / "point.json") or {}
        out = {**src_info, "status": src_info.get("status", "done"), "copied_from": str(src.run_dir), "wall_s": 0.0}
    _write_json(dst.run_dir / "point.json", out)
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
        proc = ctx.Process(target=_worker, args=(wid, threads, tasks, results, stop), daemon=True)
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
                            _write_json(p.run_dir / "point.json", info)
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


# --------------------------------------------------------------------------- the report


def _metric(ev: dict, name: str) -> float | None:
    cur: Any = ev
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) else None


def load_ablation(out_dir: str | Path) -> tuple[GridRecipe, list[dict]]:
    out_dir = Path(out_dir)
    data = _read_json(out_dir / "ablation.json")
    if data is None:
        raise RecipeError(f"{out_dir}: no readable ablation.json here; is this an lcsm ablate directory?")
    try:
        return GridRecipe.model_validate(data["grid"]), list(data["points"])
    except (KeyError, TypeError, ValidationError) as err:
        raise RecipeError(f"{out_dir}/ablation.json: not what lcsm ablate writes ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def collect(out_dir: str | Path) -> tuple[GridRecipe, list[dict]]:
    """One row per point from the run directories: axes, seed, status, metrics, error."""
    grid, points = load_ablation(out_dir)
    rows = []
    for p in points:
        run_dir = Path(out_dir) / "runs" / p["id"]  # where expand() put it: the folder may have moved since
        status = point_status(run_dir)
        info = _read_json(run_dir / "point.json") or {}
        ev = _read_json(run_dir / "eval.json") or {}
        row = {"id": p["id"], **p["labels"], "seed": p["seed"], "status": status}
        row["step"] = ev.get("step", info.get("step"))
        for m in METRICS:
            row[m] = _metric(ev, m) if status == "done" else None
        metric = grid.report_metric
        if metric not in METRICS:
            row[metric] = _metric(ev, metric) if status == "done" else None
        row["elapsed_s"] = info.get("elapsed_s")
        row["error"] = info.get("error") if status == "failed" else None
        row["_values"] = p["values"]
        rows.append(row)
    return grid, rows


def summarise(grid: GridRecipe, rows: list[dict]) -> list[dict]:
    """Groups over every axis but best_of.key: per value of that key the mean over seeds, the best
    value chosen by best_of, then the mean ± std over seeds there. Rows in grid order."""
    metric, axes = grid.report_metric, list(grid.grid)
    key = grid.best_of.key if grid.best_of else None
    sel_metric = grid.best_of.metric if grid.best_of else metric
    sel_mode = grid.best_of.resolved_mode if grid.best_of else grid.report_mode
    groups: dict[tuple, dict] = {}
    for row in rows:
        g = tuple(row[a] for a in axes if a != key)
        entry = groups.setdefault(g, {"labels": {a: row[a] for a in axes if a != key}, "values": {a: row["_values"][a] for a in axes if a != key}, "by": {}, "failed": 0, "pending": 0})
        by = entry["by"].setdefault(row[key] if key else "-", {"sel": [], "metric": []})
        if row["status"] == "done":
            if row.get(sel_metric) is not None:
                by["sel"].append(row[sel_metric])
            if row.get(metric) is not None:
                by["metric"].append(row[metric])
        elif row["status"] == "failed":
            entry["failed"] += 1
        else:
            entry["pending"] += 1
    out = []
    for entry in groups.values():
        scored = {k: _mean(v["sel"]) for k, v in entry["by"].items() if v["sel"]}
        best = None
        if scored:
            best = (max if sel_mode == "max" else min)(scored, key=lambda k: scored[k])
        vals = entry["by"][best]["metric"] if best is not None else []
        out.append({
            **entry,
            "best": best if key else None,
            "mean": _mean(vals) if vals else None,
            "std": _std(vals) if vals else None,
            "n": len(vals),
            "sweep": {k: _mean(v["metric"]) if v["metric"] else None for k, v in entry["by"].items()},
        })
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(grid: GridRecipe, rows: list[dict], summary: list[dict]) -> str:
    metric, key = grid.report_metric, grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    sel = f"; best {key} by {grid.best_of.metric} ({grid.best_of.resolved_mode})" if key else ""
    lines += [
        f"{len(rows)} points ({done} done, {failed} failed, {len(rows) - done - failed} not run); "
        f"{metric}: mean ± std over seeds {', '.join(map(str, grid.seeds))}{sel}.",
        "",
    ]
    head = axes + ([f"best {key.split('.')[-1]}"] if key else []) + [metric, "seeds"] + ([f"{metric} per {key.split('.')[-1]}"] if key else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in summary:
        cells = [s["labels"][a] for a in axes]
        if key:
            cells.append(s["best"] or "-")
        cells.append("-" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        cells.append(str(s["n"]) + (f" ({s['failed']} failed)" if s["failed"] else ""))
        if key:
            cells.append(", ".join(f"{k}: {_fmt(v, 3)}" for k, v in s["sweep"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    pivot = _pivot(grid, summary)
    if pivot:
        lines += ["", pivot]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r['id']}`: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(lines) + "\n"


def _pivot(grid: GridRecipe, summary: list[dict]) -> str | None:
    """With plot.x: one row per line (the other axes), one column per (panel, x)."""
    x, panel = grid.plot.x, grid.plot.panel
    if x is None:
        return None
    key = grid.best_of.key if grid.best_of else None
    rest = [a for a in grid.grid if a not in (key, x, panel)]
    cols = list(dict.fromkeys((s["labels"][panel] if panel else "", s["labels"][x]) for s in summary))
    table: dict[tuple, dict] = {}
    for s in summary:
        r = tuple(s["labels"][a] for a in rest)
        table.setdefault(r, {})[(s["labels"][panel] if panel else "", s["labels"][x])] = s["mean"]
    head = [" / ".join(rest) or "variant"] + [f"{p} {x.split('.')[-1]}={v}".strip() for p, v in cols]
    lines = [f"{grid.report_metric} by {x}" + (f" and {panel}" if panel else "") + ":", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r, cells in table.items():
        lines.append("| " + " | ".join([" / ".join(r) or "-"] + [_fmt(cells.get(c), 3) for c in cols]) + " |")
    return "\n".join(lines)


def write_csv(path: Path, grid: GridRecipe, rows: list[dict]) -> None:
    fields = ["id", *grid.grid, "seed", "status", "step", *METRICS]
    if grid.report_metric not in fields:
        fields.append(grid.report_metric)
    fields += ["elapsed_s", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    path.write_text(buf.getvalue())


def plot(grid: GridRecipe, summary: list[dict], path: Path) -> Path | None:
    """The metric against plot.x, one line per combination of the other axes (or bars without x),
    one panel per value of plot.panel. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric, x, panel = grid.report_metric, grid.plot.x, grid.plot.panel
    key = grid.best_of.key if grid.best_of else None
    rest = [a for a in grid.grid if a not in (key, x, panel)]
    panels = list(dict.fromkeys(s["labels"][panel] for s in summary)) if panel else [None]
    fig, axs = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) if x else max(6, 0.5 * len(summary) / len(panels) + 3) * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = list(dict.fromkeys(tuple(s["labels"][a] for a in rest) for s in summary))
    for ax, pv in zip(axs[0], panels):
        mine = [s for s in summary if panel is None or s["labels"][panel] == pv]
        if x:
            for n, line in enumerate(lines):
                pts = sorted((float(s["values"][x]), s["mean"], s["std"]) for s in mine if tuple(s["labels"][a] for a in rest) == line and s["mean"] is not None)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                                color=colors[n % len(colors)], linestyle="-" if n < len(colors) else "--", label=" / ".join(line) or metric)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({float(v) for v in grid.grid[x]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(x)
            if metric in ("accuracy", "token_accuracy"):
                ax.set_ylim(-0.02, 1.02)
        else:
            names = [" / ".join(s["labels"][a] for a in rest) or "-" for s in mine]
            means = [s["mean"] if s["mean"] is not None else float("nan") for s in mine]
            bars = ax.bar(range(len(mine)), means, yerr=[s["std"] or 0 for s in mine], capsize=3, color=[colors[n % len(colors)] for n in range(len(mine))])
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
            ax.set_xticks(range(len(mine)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            finite = [m for m in means if m == m]
            if finite and metric in LOWER_IS_BETTER:
                lo, hi = min(finite), max(finite)
                ax.set_ylim(max(0, lo - 0.1 * (hi - lo + 1e-3) - 0.02), hi + 0.1 * (hi - lo + 1e-3) + 0.02)
        ax.set_title(f"{panel} {pv}" if panel else grid.name)
        ax.set_ylabel(metric + (f" (best {key.split('.')[-1]})" if key else ""))
        ax.grid(alpha=0.3)
    if x and any(len(lines) for _ in [0]):
        axs[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{grid.name}: {metric}" + (f", mean ± std over {len(grid.seeds)} seeds" if len(grid.seeds) > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(out_dir: str | Path) -> dict:
    """results.csv, results.md, failures.json and the plot, from the run directories.
    Returns {"csv", "md", "failures", "png", "rows", "summary"}."""
    out_dir = Path(out_dir)
    grid, rows = collect(out_dir)
    summary = summarise(grid, rows)
    write_csv(out_dir / "results.csv", grid, rows)
    (out_dir / "results.md").write_text(markdown(grid, rows, summary))
    failures = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    _write_json(out_dir / "failures.json", failures)
    png, missing = None, None
    if not any(s["mean"] is not None for s in summary):
        missing = "no finished point yet"
    else:
        png = plot(grid, summary, out_dir / f"{grid.report_metric}.png")
        if png is None:
            missing = "matplotlib is not installed; pip install 'lcsm[plots]', then lcsm ablate --report DIR"
    return {"csv": out_dir / "results.csv", "md": out_dir / "results.md", "failures": out_dir / "failures.json", "png": png,
            "png_missing": missing, "rows": rows, "summary": summary}
