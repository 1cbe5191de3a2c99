"""Training recipes: pydantic models of a recipe, loading, model resolution and --set overrides.

A recipe is YAML naming a model (a zoo name, a spec path, an inline spec, or `base:` plus changes),
a task (discriminated by `kind`, or the name/path of a task file), the optimizer, the schedule and
the run's bookkeeping. Everything is checked before any tensor is made; errors name the field and
the YAML line. See docs/training.md for every field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lcsm.config.base import Base, FieldError, RecipeError, format_errors, load_yaml, path_component_problem
from lcsm.config.paths import find_file, resolve_recipe_path, resolve_spec_path, shipped_recipes
from lcsm.config.spec import ModelSpec
from lcsm.tasks import Task


# --------------------------------------------------------------------------- optimisation


class Optimizer(Base):
    """AdamW; weight decay applies to matrices and embeddings, not to gains and biases."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null for none")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1) (got {list(v)})")
        return v


class Schedule(Base):
    """Linear warmup, then cosine decay to min_lr_ratio·lr at the last step (or a constant lr)."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0, description="default: 5% of the steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


Backend = Literal["auto", "triton", "torch", "reference"]  # lcsm.kernels.BACKENDS (a test keeps them equal)
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


class Checkpointing(Base):
    """Activation checkpointing: a block keeps only its input for the backward and is recomputed
    there — less memory for long sequences, about one more forward of compute."""

    every: int = Field(1, ge=1, description="checkpoint every N-th block (1: all of them)")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs


class Compile(Base):
    """torch.compile of every block (`compile: true` is `compile: {mode: default}`)."""

    mode: Literal[COMPILE_MODES] = Field(
        "default", description="torch.compile's mode: default; reduce-overhead (CUDA graphs: the host leaves the "
        "step, one process only); max-autotune (CUDA graphs and Inductor's GEMM tuning: long first steps); "
        "max-autotune-no-cudagraphs")

    @property
    def graphs(self) -> bool:
        return self.mode in GRAPH_MODES

    def options(self) -> dict:
        """torch.compile's keywords for Model.compile_blocks."""
        return {} if self.mode == "default" else {"mode": self.mode}

    def problem_with(self, world: int) -> str | None:
        """Why this setting cannot run on `world` processes (None if it can): lcsm has not run CUDA
        graphs under DDP or FSDP, whose communication hooks sit between the compiled blocks."""
        if self.graphs and world > 1:
            return (f"mode '{self.mode}' captures CUDA graphs, which lcsm runs in one process only (this run has "
                    f"{world}); with several ranks use compile: true")
        return None


class Parallel(Base):
    """The device mesh: world size = data × sequence; how the data ranks hold the weights (docs/parallel.md)."""

    sequence: int = Field(1, ge=1, description="ranks that split each sequence along time (LASP-2)")
    data: int = Field(1, ge=1, description="ranks that take different rows of each batch")
    strategy: Literal["ddp", "fsdp", "hsdp"] = Field(
        "ddp", description="ddp: replicated weights (DistributedDataParallel); fsdp: weights, gradients and AdamW "
        "moments sharded over all ranks (FSDP2 fully_shard); hsdp: sharded within groups of `shard` data ranks, "
        "replicated across the groups")
    shard: int | None = Field(None, ge=1, description="hsdp only: data ranks per shard group (must divide data)")

    @model_validator(mode="after")
    def _shard(self):
        if self.strategy == "hsdp":
            # (that shard divides data is checked with the mesh: --nproc N may set data = N after this)
            if self.shard is None:
                raise FieldError("shard", "strategy hsdp needs shard: the data ranks of one shard group (a divisor of data)")
        elif self.shard is not None:
            raise FieldError("shard", f"shard only applies with strategy: hsdp (here strategy is '{self.strategy}')")
        return self


class Recipe(Base):
    """Everything one training run needs."""

    name: str | None = Field(None, description="default: the recipe file's name")
    description: str | None = None
    model: ModelSpec
    task: Task
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    batch_size: int = Field(64, ge=1)
    steps: int | None = Field(None, ge=1, description="optimizer steps (give steps or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (give steps or epochs)")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations; default: 10 per run")
    eval_batch_size: int | None = Field(None, ge=1, description="default: batch_size")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints; default: eval_every")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept, the newest; an older one is removed only "
                                  "once a newer one is written and verified")
    log_every: int = Field(10, ge=1, description="steps between lines of metrics.jsonl")
    log: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"], description="metric sinks besides metrics.jsonl (always written): tensorboard, wandb")
    early_stop: float | None = Field(None, gt=0, le=1, description="stop once the eval accuracy reaches this")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere")
    backend: Backend = Field("auto", description="recurrence backend of the EOS layers: auto (triton on CUDA, torch "
                             "elsewhere), triton, torch, reference (the fp64 loop)")
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: torch's choice (all cores)")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    out_dir: str | None = Field(None, description="the run directory; default runs/<name>")
    parallel: Parallel = Field(default_factory=Parallel, description="data × sequence device mesh and the data-parallel "
                               "strategy (launch with torchrun or --nproc)")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step: the batch_size rows are split into "
                            "this many forward/backward passes (less activation memory, the same step)")
    compile: Compile | None = Field(None, description="torch.compile each block (the recurrence is one custom op); first "
                                    "steps compile. true (mode default), or {mode: reduce-overhead} for CUDA graphs")
    checkpointing: Checkpointing | None = Field(None, description="activation checkpointing of blocks, e.g. {every: 1}")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not DEVICE.match(v):
            raise ValueError(f"unknown device '{v}'; allowed: auto, cpu, cuda, cuda:N, mps")
        return v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v):
        # true and false as well as the options: `compile: true` is {mode: default}, false is eager
        if v is True:
            return {}
        if v is False or v is None:
            return None
        if isinstance(v, (dict, Compile)):
            return v
        raise ValueError(f"true, false or {{mode: ...}} (got {v!r})")

    @model_validator(mode="after")
    def _length_and_vocab(self):
        if (self.steps is None) == (self.epochs is None):
            raise FieldError("steps", "give exactly one of steps or epochs")
        if self.out_dir is None and self.name is not None:
            problem = path_component_problem(self.name)
            if problem:  # the name becomes runs/<name>: it must stay there
                raise FieldError("name", f"{problem}; a run's name is its folder in runs/ (letters, digits, "
                                 "'-', '_', '.'), or give out_dir for another place")
        warmup = self.schedule.warmup_steps
        if warmup is not None and self.steps is not None and warmup > self.steps:
            raise FieldError(("schedule", "warmup_steps"), f"{warmup} warmup steps exceed the run's {self.steps} steps "
                             f"(the learning rate would never reach optimizer.lr); use at most {self.steps}, e.g. "
                             f"--set schedule.warmup_steps={self.steps // 10}")
        if self.batch_size % self.parallel.data:
            raise FieldError(("parallel", "data"), f"data = {self.parallel.data} must divide batch_size = {self.batch_size}")
        if self.batch_size % (self.accumulate * self.parallel.data):
            raise FieldError("accumulate", f"accumulate × parallel.data = {self.accumulate} × {self.parallel.data} must "
                             f"divide batch_size = {self.batch_size} (every micro-batch splits evenly over the data ranks)")
        problem = self.compile and self.compile.problem_with(self.parallel.sequence * self.parallel.data)
        if problem:
            raise FieldError("compile", problem)
        if self.parallel.sequence > 1 and getattr(self.task, "packing", None) == "documents":
            raise FieldError(("parallel", "sequence"), "packed documents (task.packing: documents) do not run under sequence "
                             "parallelism; use sequence: 1 or task.packing: windows")
        vocab = self.task.model_vocab_size
        if self.model.vocab_size != vocab:
            # the task owns the vocabulary: a spec's own vocab_size (zoo specs say 8192) is replaced
            self.model = self.model.model_copy(update={"vocab_size": vocab})
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name or 'run'}")

    def resolved(self) -> dict:
        """The recipe as plain data, model inlined: what config.yaml holds and load_recipe reads back."""
        data = self.model_dump(mode="json")
        # the model keeps only what was set: its conditional fields (tau, slopes, ...) must not
        # reappear as explicit values where they are rejected
        data["model"] = self.model.model_dump(mode="json", exclude_unset=True)
        return data


# --------------------------------------------------------------------------- loading


def resolve_model(value: Any, base: Path | None, where: str = "model") -> dict:
    """The model section as a spec mapping: a zoo name, a spec path, a mapping, or
    {base: NAME_OR_PATH, ...changes} (the changes merged over the base spec)."""
    if isinstance(value, str):
        path = resolve_spec_path(value)
        if not path.exists():
            path = find_file(value, base)
        data, _ = load_yaml(path)
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: {value} is not a model spec (a mapping of fields)")
        return data
    if isinstance(value, dict) and "base" in value:
        changes = {k: v for k, v in value.items() if k != "base"}
        if not isinstance(value["base"], str):
            raise RecipeError(f"{where}.base: a zoo name or a spec path (got {value['base']!r})")
        return merge(resolve_model(value["base"], base, f"{where}.base"), changes)
    if isinstance(value, dict):
        return value
    raise RecipeError(f"{where}: a zoo name, a spec path or a mapping of spec fields (got {value!r})")


def resolve_task(value: Any, base: Path | None, where: str = "task") -> Any:
    """The task section: a mapping, or the name of a shipped task file / a path to one."""
    if not isinstance(value, str):
        return value
    path = shipped_recipes("tasks").get(value) or find_file(value, base)
    if not path.exists():
        raise RecipeError(f"{where}: {value}: no such file, and not a shipped task ({', '.join(shipped_recipes('tasks'))})")
    data, _ = load_yaml(path)
    return data


def merge(base: dict, changes: dict) -> dict:
    """changes deep-merged over base; a mapping whose `kind` changes is replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 0.0003). Values are YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key.strip()):
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE, e.g. --set optimizer.lr=3e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 as a string
    return key.strip().split("."), parsed


def apply_override(data: dict, keys: list[str], value: Any, text: str, base: Path | None) -> None:
    cur: Any = data
    for depth, key in enumerate(keys[:-1]):
        if depth == 0 and key == "model":
            model = cur.get("model")
            if isinstance(model, str) or (isinstance(model, dict) and "base" in model):
                cur["model"] = resolve_model(model, base)  # overrides act on the spec's fields
        if depth == 0 and key == "task" and isinstance(cur.get("task"), str):
            cur["task"] = resolve_task(cur["task"], base)
        if isinstance(cur, list):
            if not key.isdigit() or int(key) >= len(cur):
                raise RecipeError(f"--set {text}: {'.'.join(keys[:depth])} has no item {key} (it has {len(cur)})")
            cur = cur[int(key)]
            continue
        nxt = cur.get(key)
        if nxt is None:
            nxt = cur[key] = {}
        if not isinstance(nxt, (dict, list)):
            raise RecipeError(f"--set {text}: {'.'.join(keys[: depth + 1])} is {nxt!r}, not a mapping")
        cur = nxt
    last = keys[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) >= len(cur):
            raise RecipeError(f"--set {text}: {'.'.join(keys[:-1])} has no item {last} (it has {len(cur)})")
        cur[int(last)] = value
    else:
        cur[last] = value


def load_recipe(recipe: str | Path | dict | None = None, overrides: list[str] = ()) -> Recipe:
    """A validated Recipe from a path, a shipped name, a mapping or None (the quick start),
    with `--set KEY.PATH=VALUE` overrides applied before validation. Raises RecipeError."""
    node, base, name = None, None, None
    if isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), "<recipe>"
    else:
        path = resolve_recipe_path(recipe)
        data, node = load_yaml(path)
        source, base, name = str(path), path.parent, path.stem
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of fields (got {type(data).__name__})")
    set_vocab, lengths = None, set()
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text, base)
        if keys == ["model", "vocab_size"]:
            set_vocab = value
        if keys in (["steps"], ["epochs"]):
            lengths.add(keys[0])
    if len(lengths) == 1:
        # --set steps=N on a recipe written in epochs (or the reverse) replaces the run length
        data.pop("epochs" if "steps" in lengths else "steps", None)
    if "model" in data:
        data["model"] = resolve_model(data["model"], base)
    if "task" in data:
        data["task"] = resolve_task(data["task"], base)
    if isinstance(data.get("task"), dict) and data["task"].get("kind") == "text":
        corpus = data["task"].get("corpus", "pydoc")
        if isinstance(corpus, str) and corpus != "pydoc":
            data["task"]["corpus"] = str(find_file(corpus, base).resolve())
    if isinstance(data.get("task"), dict) and data["task"].get("kind") == "corpus" and isinstance(data["task"].get("path"), str):
        data["task"]["path"] = str(find_file(data["task"]["path"], base).resolve())
    if name and not data.get("name"):
        data["name"] = name
    try:
        result = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, data, source, node)) from None
    if set_vocab is not None and set_vocab != result.model.vocab_size:
        raise RecipeError(
            f"--set model.vocab_size={set_vocab}: the task sets the vocabulary ({result.model.vocab_size}); "
            "change the task's vocab_size (or its tokenizer) instead"
        )
    return result
