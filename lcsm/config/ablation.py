"""Ablation recipes: a base training recipe plus axes, expanded into validated points.

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
    stats: [parameters, state_size]                  # model statistics beside the results
    slices: {by: num_kv_pairs}                       # the metric per test slice, table and plot
    fit: {kind: power_law, x: compute, y: loss, by: model}   # L = a·C^b per value of an axis

Every point (the product of the axes and the seeds) is validated as a Recipe before anything runs;
lcsm/run/ablate.py runs them and lcsm/run/report.py reports them. See docs/ablations.md.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lcsm.config.base import Base, FieldError, RecipeError, SpecError, format_errors, load_yaml, path_component_problem
from lcsm.config.paths import find_file, resolve_shipped_path, shipped_recipes
from lcsm.config.recipe import apply_override, load_recipe, parse_override, resolve_model, resolve_task

METRICS = ("loss", "accuracy", "token_accuracy", "bits_per_byte", "perplexity")
LOWER_IS_BETTER = ("loss", "bits_per_byte", "perplexity")
# statistics of a point's model (lcsm/run/modelstats.py), as `lcsm show` counts them
STATS = ("parameters", "non_embedding_parameters", "active_parameters", "state_size", "flops_per_token")


# --------------------------------------------------------------------------- the grid recipe


class Variant(Base):
    """One value of a named axis: a label and the dotted overrides it stands for."""

    label: str = Field(min_length=1)
    set: dict[str, Any] = Field(description="dotted recipe key -> value, applied in order")

    @field_validator("label")
    @classmethod
    def _one_name(cls, v):
        problem = path_component_problem(v)
        if problem:  # a label spells part of its point's folder name in OUT/<name>/runs/
            raise ValueError(f"{problem}; a label names a run folder: no '..', path separators or absolute paths")
        return v


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


class SliceReport(Base):
    """The metric per test slice (eval.json's `slices`, e.g. MQAR accuracy per number of key-value
    pairs) at each combination's best best_of value: a table (mean ± std over seeds) and a plot
    against the slice field, one line per combination."""

    by: str = Field(description="a numeric field of every test slice, e.g. num_kv_pairs or seq_len")
    metric: str | None = Field(None, description="a metric of the slices; default the reported metric")


class Fit(Base):
    """A power law y = a·x^b fitted per value of an axis (least squares in log space, with standard
    errors), printed in results.md and plotted on log axes (fit.png)."""

    kind: Literal["power_law"] = "power_law"
    x: Literal["compute", "parameters", "tokens"] = Field(
        "compute", description="compute: 3 × forward FLOPs per token (lcsm show) × training tokens; parameters: "
        "non-embedding parameters; tokens: training tokens")
    y: str = Field("loss", description="a metric of eval.json (loss, bits_per_byte, ...)")
    by: str | None = Field(None, description="a grid axis: one fit per value (e.g. the model); none: one fit")
    reference: dict[str, float] = Field(default_factory=dict, description="label of `by` -> a published exponent b, shown beside the fit")
    reference_source: str | None = Field(None, description="where the reference exponents come from")


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
    stats: list[Literal[STATS]] = Field(default_factory=list, description="model statistics reported beside the results")
    slices: SliceReport | None = None
    fit: Fit | None = None

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v):
        problem = path_component_problem(v) if v is not None else None
        if problem:  # the ablation's directory is --out/<name>: it must stay there
            raise ValueError(f"{problem}; an ablation's name is its folder in --out (letters, digits, '-', '_', '.')")
        return v

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
                        raise FieldError((axis, n), "; ".join(f"{'.'.join(map(str, x['loc']))}: {(x.get('ctx') or {}).get('error') or x['msg']}"
                                                             for x in e.errors())) from None
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
        if len(set(self.stats)) != len(self.stats):
            raise FieldError("stats", "a statistic is listed twice")
        if self.fit is not None:
            if self.fit.by is not None and self.fit.by not in self.grid:
                raise FieldError(("fit", "by"), f"'{self.fit.by}' is not a grid axis ({', '.join(self.grid)})")
            if self.best_of and self.fit.by == self.best_of.key:
                raise FieldError(("fit", "by"), f"'{self.fit.by}' is the best_of axis: the fit takes each point at its best value")
            if self.fit.y not in METRICS:
                raise FieldError(("fit", "y"), f"'{self.fit.y}' is not a metric ({', '.join(METRICS)})")
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
        grid = GridRecipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, data, source, node)) from None
    fit = grid.fit
    if fit is not None and fit.reference:
        # checked on the recipe as written, not after --grid narrows the axis (a reference for a
        # model left out of a run is simply not shown)
        labels = [_label(v) for v in grid.grid[fit.by]] if fit.by else []
        unknown = [k for k in fit.reference if k not in labels]
        if unknown:
            raise RecipeError(f"{source}: fit.reference: {', '.join(unknown)} not among the values of "
                              f"{fit.by or '(no fit.by axis)'} ({', '.join(labels)})")
    return grid, folder


def _base_data(base: str | dict, folder: Path | None) -> dict:
    """The base training recipe as plain data with its model and task inlined, so that grid keys
    such as model.d_model act on spec fields whatever form the base gave the model in."""
    if isinstance(base, str):
        path = shipped_recipes().get(base) or find_file(base, folder)
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
            task["corpus"] = str(find_file(corpus, folder).resolve())
    return data


def _apply(data: dict, key: str, value: Any, where: str) -> None:
    keys = key.split(".")
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"{where}: '{key}' is not a dotted recipe key")
    apply_override(data, keys, copy.deepcopy(value), f"{key}={value!r}", None)
    if keys in (["steps"], ["epochs"]):  # a run length replaces the other one, as with lcsm train --set
        data.pop("epochs" if keys == ["steps"] else "steps", None)


def narrow(grid: GridRecipe, axes: dict[str, list], seeds: list[int] | None, source: GridRecipe | None = None) -> GridRecipe:
    """A copy of the grid with some axes replaced (a named axis keeps the variants whose labels are
    listed, in that order) and other seeds. Labels are looked up in `source` (default: the grid
    itself): the recipe as written, so that --grid after --reduced can name a variant that the
    reduced grid left out."""
    data = grid.model_dump(mode="json", exclude_none=True)
    for axis, values in axes.items():
        if axis not in grid.grid:
            raise RecipeError(f"--grid {axis}: not an axis of {grid.name} ({', '.join(grid.grid)})")
        old = (source or grid).grid[axis]
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


def parse_axis(text: str) -> tuple[str, list]:
    """'model.d_model=[64,128]' -> ('model.d_model', [64, 128]); a single value is a list of one."""
    if "=" not in text:
        raise RecipeError(f"--grid {text}: expected AXIS=[V1,V2,...], e.g. --grid model.d_model=[64,128]")
    axis, _, rest = text.partition("=")
    _, value = parse_override("x=" + rest)
    values = value if isinstance(value, list) else [value]
    values = [float(v) if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v for v in values]
    return axis.strip(), values
