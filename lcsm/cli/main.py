"""The `lcsm` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lcsm.config.base import SpecError, path_component_problem
from lcsm.config.spec import EOSMixer, ModelSpec, load_model_spec

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # never break a path across lines


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def describe_stages(spec: ModelSpec) -> dict[str, str]:
    """One short line per stage of the mixer, for tables."""
    m = spec.mixer
    if not isinstance(m, EOSMixer):
        return {"mixer": f"softmax attention, {m.position} positions"}

    def key(stage) -> str:
        if stage.tie != "none":
            return stage.tie.replace("_", " ")
        parts = [stage.resolved_source]
        if stage.feature_map != "identity":
            parts.append(stage.feature_map)
        if stage.conv:
            parts.append(f"conv{stage.conv}")
        if stage.scale != "none":
            parts.append(f"×{stage.scale}")
        return " ".join(parts)

    i = [m.input.feature_map] + ([f"conv{m.input.conv}"] if m.input.conv else []) + (["×Δ"] if m.input.scale_by == "dt" else [])
    out = {"input": " ".join(i), "expand": key(m.expand), "oscillation": m.oscillation.describe(), "shrink": key(m.shrink)}
    if m.routing is not None:
        r = m.routing
        out["routing"] = (f"{r.memories} memories, top-{r.top_k}{' + shared' if r.shared else ''}, "
                          f"per memory: {', '.join(r.per_memory) or 'none'}, aux {r.aux_loss_weight:g}, path {r.path}")
    return out


@contextmanager
def _meta_device():
    # Building on the meta device counts parameters without allocating them.
    import torch

    with torch.device("meta"):
        yield


def build_meta(spec: ModelSpec):
    from lcsm.nn.model import Model
    from lcsm.run.size import count_parameters

    count_parameters(spec)  # an absurd size is a SpecError here, before a module is built
    with _meta_device():
        return Model(spec)


def _output_file(path: str, option: str, suffixes: tuple[str, ...]) -> Path:
    """A file an option writes, checked before any work: its extension, and that its folder exists."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: the file must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name ending in {' or '.join(suffixes)}")
    if not p.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {p.parent} does not exist")
    return p


# --------------------------------------------------------------------------- commands


def cmd_zoo(args) -> int:
    from lcsm.config.paths import zoo_paths

    rows = []
    for name, path in zoo_paths().items():
        spec = load_model_spec(path)
        model = build_meta(spec)
        layer = model.summary()[0]
        state = f"{_si(layer.state_size)}/token" if layer.state_grows else _si(layer.state_size)
        osc = describe_stages(spec).get("oscillation", "attention").split(" ")[0]
        about = (spec.description or "").split(":")[0]
        rows.append((name, osc, f"{spec.d_model}×{spec.n_layers}", _si(model.num_parameters()), state, about))
    table = Table(title="lcsm zoo (recipes/models)", title_justify="left")
    for k, col in enumerate(("name", "oscillation", "size", "params", "state/layer")):
        table.add_column(col, no_wrap=True, min_width=max(len(col), *(len(r[k]) for r in rows)))
    table.add_column("about", no_wrap=True, overflow="ellipsis", max_width=40)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print("Use a name wherever a spec path is expected, e.g. [bold]lcsm show gla[/bold].")
    return 0


def _kind_of(path: str) -> str:
    """'spec', 'recipe' or 'ablation': what a file (by its top-level keys) or a shipped name is."""
    from lcsm.config.base import load_yaml
    from lcsm.config.paths import _looks_like_path, shipped

    if not _looks_like_path(Path(path)):
        for kind, folder in (("spec", "models"), ("recipe", "train"), ("ablation", "ablations")):
            if path in shipped(folder):
                return kind
        return "spec"  # (load_model_spec names the zoo in its error)
    data, _ = load_yaml(path)
    if isinstance(data, dict) and "grid" in data and "base" in data:
        return "ablation"
    if isinstance(data, dict) and ("task" in data or "model" in data) and "d_model" not in data:
        return "recipe"
    return "spec"


def _validate(path: str) -> str:
    """Validate a spec, a training recipe or an ablation recipe (every point) without training;
    returns what it is, for the ok line. Raises SpecError."""
    from lcsm.run.size import count_parameters

    kind = _kind_of(path)
    if kind == "recipe":
        from lcsm.config.recipe import load_recipe

        recipe = load_recipe(path)
        length = f"{recipe.steps} steps" if recipe.steps else f"{recipe.epochs:g} epochs"
        return (f"training recipe: {recipe.model.name or 'model'}, {count_parameters(recipe.model)} parameters, "
                f"task {recipe.task.kind}, {length} -> {recipe.run_dir}")
    if kind == "ablation":
        from lcsm.config.recipe import load_recipe
        from lcsm.run import ablate

        ab = ablate.prepare(path)
        models = {json.dumps(p.recipe["model"], sort_keys=True): p for p in ab.points}
        for p in models.values():
            try:
                count_parameters(load_recipe(p.recipe).model)
            except SpecError as e:
                raise SpecError(f"{ab.grid.name}: point {p.id}: {e}") from None
        return f"ablation recipe: {len(ab.points)} points, every one a valid training recipe -> {ab.out_dir}"
    spec = load_model_spec(path)
    return f"{spec.name or 'unnamed'}, {count_parameters(spec)} parameters"


def cmd_validate(args) -> int:
    failed = 0
    for path in args.specs:
        try:
            what = _validate(path)
            out.print(f"[green]ok[/green]      {escape(path)}  ({escape(what)})", soft_wrap=True)
        except SpecError as e:
            failed += 1
            err.print(f"[red]invalid[/red] {escape(path)}\n{escape(str(e))}")
    return 2 if failed else 0


def _show_target(target: str) -> ModelSpec:
    """The spec of `lcsm show TARGET`: a zoo name or spec YAML, a recipe (a run's config.yaml) or a run directory."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise UsageError(f"{target}: a directory without config.yaml; give a spec, a recipe or a run directory")
        path = path / "config.yaml"
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            data = None  # load_model_spec reports it with the line
        if isinstance(data, dict) and "model" in data and "task" in data:  # a recipe: its model
            from lcsm.config.recipe import load_recipe

            return load_recipe(path).model
    return load_model_spec(target)


def cmd_show(args) -> int:
    spec = _show_target(args.spec)
    model = build_meta(spec)
    rows = model.summary(context=args.context)
    out.print(f"[bold]{escape(spec.name or args.spec)}[/bold]: {escape(spec.description or '')}".rstrip(": "))
    for name, text in describe_stages(spec).items():
        out.print(f"  {name:<12} {escape(text)}")
    if isinstance(spec.mixer, EOSMixer):
        H, K, V = spec.mixer.dims(spec.d_model, spec.n_heads)
        out.print(f"  {'heads':<12} H={H}  K={K}  V={V}")
    if spec.mixer.head_routing is not None:
        out.print(f"  {'head groups':<12} {escape(spec.mixer.head_routing.describe())} (attention experts)")
    for name, mixer in spec.mixers.items():
        text = describe_stages(spec.model_copy(update={"mixer": mixer}))
        if mixer.head_routing is not None:
            text["head groups"] = mixer.head_routing.describe()
        out.print(f"  {name:<12} " + escape(" · ".join(f"{k} {v}" for k, v in text.items())))
    if spec.pattern:
        out.print(f"  {'pattern':<12} {' '.join(spec.pattern)} (× {spec.n_layers // len(spec.pattern)})")
    channel = spec.channel_mixer.describe()
    if channel:
        out.print(f"  {'channel':<12} {escape(channel)}")
    routed = any(r.active_parameters != r.parameters for r in rows)
    table = Table(title_justify="left")
    cols = ("layer", "mixer", "parameters", *(("active/token",) if routed else ()), "state size", "FLOPs/token")
    for col in cols:
        table.add_column(col, justify="right" if col != "mixer" else "left")
    for r in rows:
        state = f"{_si(r.state_size)} per token" if r.state_grows else _si(r.state_size)
        active = (_si(r.active_parameters),) if routed else ()
        table.add_row(str(r.index), r.mixer, _si(r.parameters), *active, state, _si(r.flops_per_token))
    out.print(table)
    embed = spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)
    total, active = model.num_parameters(), model.active_parameters()
    out.print(
        f"total {_si(total)} parameters ({_si(embed)} in embeddings"
        f"{', tied' if spec.tie_embeddings else ''})"
        + (f", {_si(active)} active per token ({100 * active / total:.0f}%: the routed experts and head groups a token "
           "is not sent to are left out)" if routed else "")
        + "; state sizes count numbers per sequence"
        + (f"; attention FLOPs at context {args.context}" if any(r.state_grows for r in rows) else "")
    )
    return 0


def cmd_upcycle(args) -> int:
    from lcsm.run.upcycle import upcycle

    result = upcycle(
        args.run, args.out, experts=args.experts, top_k=args.top_k, split=args.split, shared=args.shared,
        scale=args.scale, router=args.router, importance=args.importance, batches=args.batches,
        attention_experts=args.attention_experts, attention_top_k=args.attention_top_k,
        attention_scale=args.attention_scale, aux_loss_weight=args.aux_loss_weight, seed=args.seed,
        overwrite=args.overwrite, device=args.device, log=lambda s: out.print(escape(s)),
    )
    r, p = result.record, result.record["parameters"]
    new = escape(str(result.run_dir))
    out.print(
        f"upcycled {escape(r['source'])} (step {r['source_step']}, a GLU of {r['dense_hidden']} neurons per layer) -> {new}: "
        f"{r['experts']} experts of {r['expert_hidden']} neurons, top-{r['top_k']}"
        + (f", a shared expert of {r['shared']}" if r["shared"] else "")
        + f", scale {r['scale']:g}, split {r['split']}" + (f" ({r['importance']}, {r['batches']} batches)" if r["importance"] else "")
        + f", router {r['router']}"
        + (f"; head groups {r['attention']['groups']}, top-{r['attention']['top_k']}" if r["attention"] else "")
    )
    out.print(f"parameters: {_si(p['total'])} total, {_si(p['active'])} active per token (dense: {_si(p['dense'])})")
    out.print(f"next: lcsm eval {new} · lcsm show {new} · lcsm train {new}/config.yaml --init-from {new} [--set steps=N]")
    return 0


def cmd_schema(args) -> int:
    from lcsm.config.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.output:
        from lcsm.run.checkpoint import write_text

        path = _output_file(args.output, "-o", (".json",))
        try:
            write_text(path, text + "\n")
        except OSError as e:
            raise UsageError(f"-o {args.output}: cannot write ({e.strerror})") from None
        out.print(f"wrote {escape(str(path))}")
    else:
        print(text)
    return 0


def _result_table(metrics: dict, title: str) -> Table:
    """One row per slice (and a total row when there are several): loss and accuracy, or for text
    loss, perplexity and bits per byte."""
    text = "bits_per_byte" in metrics
    table = Table(title=title, title_justify="left")
    cols = ("slice", "examples", "tokens", "loss", "ppl", "bits/byte") if text else ("slice", "examples", "loss", "accuracy")
    for col in cols:
        table.add_column(col, justify="left" if col == "slice" else "right")

    def row(name: str, m: dict):
        if text:
            return (name, str(m["examples"]), f"{m['tokens']:,}", f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", f"{m['bits_per_byte']:.3f}")
        return (name, str(m["examples"]), f"{m['loss']:.4f}", f"{m['accuracy']:.3f}")

    slices = metrics.get("slices", {})
    for name, m in slices.items():
        table.add_row(*row(name, m))
    if len(slices) != 1:
        table.add_row(*row("all", metrics), style="bold")
    return table


def cmd_train(args) -> int:
    from lcsm.config.recipe import load_recipe
    from lcsm.run.trainer import TrainingError, train

    recipe = load_recipe(args.recipe, args.set or [])
    if args.nproc is not None:
        return _launch(args, recipe)
    try:
        # retune: a resume may lower the learning rate (what the non-finite-loss message suggests)
        result = train(recipe, resume=args.resume == "auto", overwrite=args.overwrite, retune=True, console=out,
                       init_from=args.init_from)
    except TrainingError as e:
        message = str(e)
        if e.resume_with:
            again = shlex.join(["lcsm", "train"] + ([args.recipe] if args.recipe else [])
                               + [a for x in [*(args.set or []), *(f"{k}={v}" for k, v in e.resume_with.items())] for a in ("--set", x)]
                               + ["--resume", "auto"] + _nproc_again())
            message += f". Continue with a lower learning rate: {again}"
        err.print(f"[red]error:[/red] {escape(message)}")
        return 1
    if _distributed_rank() > 0:
        return 0  # rank 0 reports
    run = escape(str(result.run_dir))
    if result.status == "interrupted":
        again = shlex.join(["lcsm", "train"] + ([args.recipe] if args.recipe else []) + [a for s in args.set or [] for a in ("--set", s)]
                           + _nproc_again())
        err.print(
            f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {run}/checkpoint. "
            f"Continue with: {escape(again)} --resume auto"
        )
        return 130
    how = "stopped early: eval accuracy reached the early_stop target" if result.status == "early_stop" else "done"
    m = result.eval
    out.print(_result_table(m, f"{escape(recipe.name or 'run')}: test results at step {result.step} ({how}, {result.elapsed_s:.0f}s training)"))
    headline = (
        f"bits per byte {m['bits_per_byte']:.3f}, perplexity {m['perplexity']:.2f}"
        if "bits_per_byte" in m
        else f"test accuracy {m['accuracy']:.3f}"
    )
    out.print(f"[bold]{headline}[/bold]. Run: {run}  (lcsm eval {run} · lcsm plot {run})")
    return 0


def _nproc_again() -> list[str]:
    """--nproc N when torchrun started this process (e.g. through --nproc): continue the same way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ["--nproc", str(world)] if world > 1 else []


def _distributed_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        return rank
    return 0


def _launch(args, recipe) -> int:
    """--nproc N: run this same command under torchrun with N processes on this machine."""
    n, par = args.nproc, recipe.parallel
    if n < 1:
        raise UsageError(f"--nproc must be at least 1 (got {n})")
    import torch

    if torch.cuda.is_available() and recipe.device != "cpu" and n > torch.cuda.device_count():
        raise UsageError(f"--nproc {n}: one GPU per process, and this machine has {torch.cuda.device_count()}")
    sets = list(args.set or [])
    data = par.data
    if par.sequence * par.data == 1:
        sets.append(f"parallel.data={n}")  # no mesh in the recipe: plain data parallelism
        data = n
    elif par.sequence * par.data != n:
        raise UsageError(
            f"--nproc {n} does not match the recipe's parallel: sequence × data = {par.sequence} × {par.data}; "
            f"use --nproc {par.sequence * par.data} or --set parallel.data=..."
        )
    from lcsm.parallel.grid import ParallelError, check_sizes

    try:  # the mesh is checked here, before anything is launched
        check_sizes(par.sequence, data, n, par.strategy, par.shard)
    except ParallelError as e:
        raise UsageError(str(e)) from None
    if recipe.batch_size % (recipe.accumulate * data):
        raise UsageError(f"--nproc {n}: accumulate × parallel.data = {recipe.accumulate} × {data} must divide "
                         f"batch_size = {recipe.batch_size}")
    problem = recipe.compile and recipe.compile.problem_with(n)
    if problem:
        raise UsageError(f"--nproc {n}: compile: {problem}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "lcsm.cli", "train"]
    cmd += [args.recipe] if args.recipe else []
    cmd += [a for x in sets for a in ("--set", x)]
    cmd += ["--resume", "auto"] if args.resume else []
    cmd += ["--init-from", args.init_from] if args.init_from else []
    cmd += ["--overwrite"] if args.overwrite else []
    out.print(f"launching: {escape(shlex.join(cmd))}")
    from lcsm.parallel.grid import run_torchrun

    return run_torchrun(cmd)


def cmd_eval(args) -> int:
    from lcsm.run.device import resolve_device, resolve_precision
    from lcsm.run.evaluate import evaluate, load_run, write_eval
    from lcsm.config.recipe import DEVICE, RecipeError, load_recipe, resolve_task
    from lcsm.tasks import TaskError, build_task

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if not DEVICE.match(args.device):
        raise UsageError(f"--device: unknown device '{args.device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    output = _output_file(args.output, "-o", (".json",)) if args.output else None
    device = resolve_device(args.device)
    if args.lm_eval is None and (args.limit is not None or args.lm_eval_include):
        raise UsageError("--limit and --lm-eval-include go with --lm-eval TASKS")
    recipe, model, run_dir, step = load_run(args.run, device, log=lambda text: err.print(escape(text)))
    if args.lm_eval is not None:
        return _lm_eval(args, recipe, model, run_dir, step, device, resolve_precision(args.precision, device), output)
    vocab = recipe.model.vocab_size
    if args.task or args.set:
        data = recipe.resolved()
        if args.task:
            data["task"] = resolve_task(args.task, None, "--task")
        recipe = load_recipe(data, [s if s.startswith("task.") else f"task.{s}" for s in args.set or []])
        if recipe.model.vocab_size != vocab:
            raise RecipeError(
                f"--task: the task's vocabulary ({recipe.model.vocab_size} tokens) differs from the model's ({vocab}); "
                "evaluate on a task with the same vocab_size (or tokenizer)"
            )
    try:
        task = build_task(recipe.task, recipe.seed, run_dir=run_dir, train=False)
    except TaskError as e:
        raise RecipeError(f"task: {e}") from None
    precision = resolve_precision(args.precision, device)
    path = output or _eval_path(run_dir, args.task)  # (checked before the evaluation runs)
    metrics = evaluate(model, task, args.batch_size or recipe.eval_batch_size or recipe.batch_size, device, precision)
    try:
        if output is None:
            from lcsm.run import files

            files.claim(run_dir, "eval", f"eval/{path.name}")
            path.parent.mkdir(exist_ok=True)
        write_eval(path, step, metrics, recipe.resolved()["task"], "lcsm eval", run=str(run_dir))
    except OSError as e:
        raise UsageError(f"{path}: cannot write the report ({e.strerror})") from None
    out.print(_result_table(metrics, f"{escape(str(run_dir))} at step {step}: {recipe.task.kind}"))
    out.print(f"wrote {escape(str(path))}")
    return 0


def _eval_path(run_dir: Path, task: str | None) -> Path:
    """Where `lcsm eval` writes by default: RUN/eval/<task>.json (test.json: the run's own test
    split), beside the training's RUN/eval.json, never over it or over a file lcsm did not write."""
    from lcsm.run import files

    name = Path(task).stem if task else "test"
    if path_component_problem(name):
        raise UsageError(f"--task {task}: cannot name a report after it; give -o FILE.json")
    path = run_dir / "eval" / f"{name}.json"
    mine = files.owned(run_dir)
    for target, rel in ((run_dir / "eval", "eval"), (path, f"eval/{name}.json")):
        if target.exists() and rel not in mine:
            raise UsageError(f"{target} was not written by lcsm; lcsm eval does not write over it: give -o FILE.json")
    return path


def _lm_eval(args, recipe, model, run_dir: Path, step: int, device, precision: str, output: Path | None) -> int:
    """lcsm eval RUN --lm-eval TASKS: lm-evaluation-harness on the run, into RUN/eval/lm_eval.json (or -o
    FILE) in the eval schema (lcsm/run/evaluate.py), beside the training's eval.json as every lcsm eval report."""
    from lcsm.run.evaluate import write_eval

    if args.task or args.set:
        raise UsageError("--lm-eval runs lm-eval's tasks; --task and --set are for lcsm's own")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    try:
        from lcsm.run import harness
    except ImportError as e:
        raise UsageError(str(e)) from None
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--lm-eval: give task names, e.g. --lm-eval lambada_openai,piqa")
    for folder in args.lm_eval_include or []:
        if not Path(folder).is_dir():
            raise UsageError(f"--lm-eval-include {folder}: no such folder")
    tok = _run_tokenizer(recipe, run_dir)
    if tok is None:
        raise UsageError(f"{run_dir} is a {recipe.task.kind} run: lm-eval needs a run with text (a text or corpus task)")
    path = output or _eval_path(run_dir, "lm_eval")  # (checked before the evaluation runs)
    try:
        report = harness.run_lm_eval(model, tok, tasks, limit=args.limit, include=args.lm_eval_include, device=device,
                                     batch_size=args.batch_size or 16, precision=precision)
    except harness.HarnessError as e:
        raise UsageError(str(e)) from None
    section, results = harness.as_eval(report, args.lm_eval_include)
    try:
        if output is None:
            from lcsm.run import files

            files.claim(run_dir, "eval", f"eval/{path.name}")
            path.parent.mkdir(exist_ok=True)
        write_eval(path, step, results, section, "lcsm eval --lm-eval", run=str(run_dir))
    except OSError as e:
        raise UsageError(f"{path}: cannot write the report ({e.strerror})") from None
    table = Table(title=f"{escape(str(run_dir))} at step {step}: lm-eval" + (f" (limit {args.limit})" if args.limit else ""),
                  title_justify="left")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for task, metrics in report["results"].items():
        for name, value in metrics.items():
            if "stderr" not in name:
                table.add_row(escape(task), escape(name.replace(",none", "")), f"{value:.4f}")
    out.print(table)
    out.print(f"wrote {escape(str(path))}")
    return 0


def _run_tokenizer(recipe, run_dir: Path):
    """The text tokenizer of a run, or None for tasks without text (MQAR, copying, induction)."""
    from lcsm.config.base import RecipeError
    from lcsm.tasks import TaskError

    try:
        return recipe.task.load_tokenizer(run_dir)
    except TaskError as e:
        raise RecipeError(str(e)) from None


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--tokens: comma-separated token ids, e.g. --tokens 1,2,3 (got {text!r})") from None
    if not ids:
        raise UsageError("--tokens: give at least one token id")
    return ids


def cmd_generate(args) -> int:

    from lcsm.run.device import resolve_device, resolve_precision
    from lcsm.run.evaluate import load_run
    from lcsm.nn.generate import check_sampling, stream
    from lcsm.config.recipe import DEVICE

    temperature = 0.0 if args.greedy else args.temperature
    try:
        check_sampling(args.max_tokens, temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(str(e).replace("max_new_tokens", "--max-tokens").replace("top_k", "--top-k").replace("top_p", "--top-p")
                         .replace("temperature", "--temperature")) from None
    if args.prompt is None and args.tokens is None:
        raise UsageError("give a prompt: --prompt TEXT (text runs) or --tokens ID,ID,... (any run)")
    if not DEVICE.match(args.device):
        raise UsageError(f"--device: unknown device '{args.device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    device = resolve_device(args.device)
    recipe, model, run_dir, step = load_run(args.run, device, log=lambda text: err.print(escape(text)))
    tok = _run_tokenizer(recipe, run_dir)
    if args.tokens is not None:
        ids = _parse_ids(args.tokens)
    elif tok is None:
        raise UsageError(
            f"{run_dir} is a {recipe.task.kind} run: it has no tokenizer to encode --prompt; give token ids with --tokens 1,2,3"
        )
    else:
        ids = tok.encode(args.prompt)
        if not ids:
            raise UsageError("--prompt: the prompt is empty; give at least one character")
    vocab = recipe.model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"--tokens: token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    if args.eos_token is not None and not 0 <= args.eos_token < vocab:
        raise UsageError(f"--eos-token: {args.eos_token} is outside the model's vocabulary [0, {vocab})")
    precision = resolve_precision(args.precision, device)
    tokens = stream(model, ids, args.max_tokens, temperature, args.top_k, args.top_p, args.seed, args.eos_token,
                    cuda_graph=False if args.no_cuda_graph else "auto", precision=precision)
    new: list[int] = []
    shown = ""
    if tok is not None and args.tokens is None and not args.quiet_prompt:
        print(args.prompt, end="", flush=True)
    for t in tokens:
        new.append(t)
        if tok is None or args.ids:
            print(t, end=" ", flush=True)
            continue
        text = tok.decode(new)
        # hold back an incomplete UTF-8 character until its last byte arrives
        ready = text.rstrip("\ufffd")
        print(ready[len(shown):], end="", flush=True)
        shown = ready
    if tok is not None and not args.ids:
        print(tok.decode(new)[len(shown):], end="")
    print(flush=True)
    return 0


def cmd_data_prepare(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from lcsm.tasks import TaskError
    from lcsm.tasks.prepare import prepare

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=err, disable=args.quiet)
    try:
        with progress:
            manifest = prepare(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction, text_key=args.text_key,
                               eos=args.eos, shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=progress,
                               log=progress.console.print)
    except TaskError as e:
        raise UsageError(str(e)) from None
    _corpus_table(manifest, args.out)
    out.print(f"wrote {escape(str(args.out))}  (train on it with task: {{kind: corpus, path: {escape(str(args.out))}}})")
    return 0


def _corpus_table(manifest: dict, path) -> None:
    tok = manifest["tokenizer"]
    table = Table(title=f"{escape(str(path))}: {tok['spec']} tokenizer, vocabulary {tok['model_vocab_size']} "
                  f"(EOS {tok['eos_id']}{' ' + escape(repr(tok['eos_token'])) if tok.get('eos_token') else ', appended'}), {manifest['dtype']}",
                  title_justify="left")
    for col in ("split", "documents", "tokens", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in manifest["splits"].items():
        table.add_row(name, f"{split['documents']:,}", f"{split['tokens']:,}", str(len(split["shards"])))
    out.print(table)
    if manifest.get("skipped"):
        out.print(f"skipped {len(manifest['skipped'])} file(s) that are not UTF-8 text, e.g. {escape(manifest['skipped'][0])}")


def cmd_data_info(args) -> int:
    from lcsm.tasks import TaskError
    from lcsm.tasks.corpus import open_split, read_manifest

    try:
        manifest = read_manifest(Path(args.path))
        for name in manifest["splits"]:
            if manifest["splits"][name]["shards"]:
                open_split(Path(args.path), manifest, name, "checksum" if args.verify else "size")
    except TaskError as e:
        raise UsageError(str(e)) from None
    _corpus_table(manifest, args.path)
    out.print("every shard matches its sha256" if args.verify else "every shard has the size of its counts (--verify: checksums)")
    return 0


def cmd_export(args) -> int:
    if args.hf is None and args.out is None:
        raise UsageError("give what to write: --hf DIR (a transformers model folder) and/or --out FILE.safetensors (the weights)")
    if args.out is not None:
        from lcsm.run.checkpoint import save_weights
        from lcsm.run.evaluate import load_run

        target = _output_file(args.out, "--out", (".safetensors",))
        if target.exists() and not args.overwrite:
            raise UsageError(f"--out {target}: exists; pass --overwrite to replace it")
        # (a sharded run's checkpoint is read whole: lcsm/run/dcp.py)
        _, model, _, step = load_run(args.run, log=lambda text: err.print(escape(text)))
        try:
            save_weights(model, target, step)
        except OSError as e:
            raise UsageError(f"--out {target}: cannot write ({e.strerror})") from None
        out.print(f"wrote {escape(str(target))} (step {step})")
    if args.hf is not None:
        try:
            import lcsm.hf as hf
        except ImportError as e:
            raise UsageError(f"--hf: {e}") from None
        try:
            folder = hf.export(args.run, args.hf, overwrite=args.overwrite)
        except hf.ExportError as e:
            raise UsageError(str(e)) from None
        files = ", ".join(sorted(p.name for p in folder.iterdir()))
        out.print(f"wrote {escape(str(folder))}: {escape(files)}")
        out.print(f"load it with: import lcsm; transformers.AutoModelForCausalLM.from_pretrained({escape(repr(str(folder)))})")
    return 0


def cmd_plot(args) -> int:
    from lcsm.run.plot import plot_runs

    if args.output:
        _output_file(args.output, "-o", (".png", ".pdf", ".svg"))
    path = plot_runs(args.runs, args.output)
    out.print(f"wrote {escape(str(path))}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds as 0,1,2 (got {text!r})") from None
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"expected non-negative seeds as 0,1,2 (got {text!r})")
    return seeds


def _summary_table(grid, summary) -> Table:
    key = grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    table = Table(title=escape(f"{grid.name}: {grid.report_metric}" + (f" at the best {key}" if key else "")), title_justify="left")
    for a in axes + ([f"best {key.split('.')[-1]}"] if key else []) + [grid.report_metric, "seeds"]:
        table.add_column(a, justify="right" if a in (grid.report_metric, "seeds") else "left")
    from lcsm.run.report import mean_std

    for s in summary:
        value = mean_std(s)  # (one seed: the value alone, no ± 0.0000)
        table.add_row(*[escape(s["labels"][a]) for a in axes], *([escape(str(s["best"] or "-"))] if key else []), value, str(s["n"]))
    return table


def _wrote(rep: dict) -> None:
    if rep["png"]:
        plot = f", {escape(str(rep['png']))}"
    elif rep["png_missing"]:
        plot = f" (no plot: {escape(rep['png_missing'])})"  # the hint says lcsm[plots]: not markup
    else:
        plot = ""
    plot += "".join(f", {escape(str(p))}" for p in rep.get("extra_png") or [])
    if rep.get("fit"):  # the fitted laws matter most in the log of a remote run: print them
        out.print(escape(rep["fit"].rstrip()))
    out.print(f"wrote {escape(str(rep['csv']))}, {escape(str(rep['md']))}{plot}")


def cmd_ablate(args) -> int:
    from lcsm.config import ablation
    from lcsm.run import ablate, report

    if args.report:
        if args.recipes:
            raise UsageError("--report DIR rebuilds a report from an ablation directory; give no recipe with it")
        for folder in args.report:
            rep = report.build_report(folder)
            grid, _ = report.load_ablation(folder)
            out.print(_summary_table(grid, rep["summary"]))
            _wrote(rep)
        return 0
    if not args.recipes:
        raise UsageError(f"give an ablation recipe (shipped: {', '.join(ablation.shipped_ablations())}) or --report DIR")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {args.jobs})")
    abls = [ablate.prepare(r, args.out, args.set or [], args.grid or [], args.seeds, args.reduced) for r in args.recipes]
    names = [a.out_dir for a in abls]
    if len(set(names)) < len(names):
        raise UsageError("two recipes share a name (and so an output directory); rename one")
    if args.dry_run:
        for ab in abls:
            axes = list(ab.grid.grid)
            table = Table(title=f"{escape(ab.grid.name)}: {len(ab.points)} points -> {escape(str(ab.out_dir))}", title_justify="left")
            for col in ["#", *axes, "seed", "steps", "status"]:
                table.add_column(col, justify="right" if col in ("#", "seed", "steps") else "left")
            for n, p in enumerate(ab.points):
                length = str(p.recipe.get("steps") or f"{p.recipe.get('epochs')} ep")
                table.add_row(str(n), *[escape(p.labels[a]) for a in axes], str(p.seed), length, ablate.point_status(p.run_dir, p.recipe))
            out.print(table)
        out.print(f"{sum(len(a.points) for a in abls)} points, every one a valid recipe (dry run: nothing trained)")
        return 0
    try:
        counts = ablate.run(abls, jobs=args.jobs, console=out)
    except KeyboardInterrupt:
        again = shlex.join(["lcsm", "ablate", *sys.argv[sys.argv.index("ablate") + 1:]]) if "ablate" in sys.argv else "the same command"
        err.print(f"interrupted; finished points are kept and interrupted ones saved. Continue with: {escape(again)}")
        for ab in abls:
            report.build_report(ab.out_dir)
        return 130
    for ab in abls:
        rep = report.build_report(ab.out_dir)
        out.print(_summary_table(ab.grid, rep["summary"]))
        _wrote(rep)
    if counts["failed"]:
        err.print(f"{counts['failed']} point(s) failed; their errors are in results.md and failures.json (rerun the command to retry them)")
        return 1
    return 130 if counts["interrupted"] else 0


# `lcsm bench NAME`: the module (lcsm.MODULE, with add_arguments and run) and its help line
BENCHMARKS = [
    ("kernels", "kernels", "the Triton recurrence beside fla-core, SDPA and the torch path, and a bf16 check"),
    ("train", "train", "training tokens/s of zoo models at one size (default ~125M), beside attention"),
    ("mom", "mom", "one Mixture-of-Memories layer (dense, sparse) against the single-memory layer, fwd and fwd+bwd"),
    ("activations", "activations", "activation memory one block keeps for its backward, bytes per token (CPU or GPU)"),
    ("decode", "decode", "decoding: ms/token and memory against context length (EOS vs KV cache), one-layer step"),
    ("parallel", "parallel", "sequence parallelism on N GPUs: SP = N against one process, tokens/s per GPU "
     "for SP against DP, the longest sequence that trains (--nproc N, or under torchrun)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcsm",
        description="Linear-complexity sequence models as Expand-Oscillation-Shrink specs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("zoo", help="list the shipped model specs")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("validate", help="check specs, training recipes and ablation recipes without training; exit 2 if any is invalid")
    p.add_argument("specs", nargs="+", metavar="FILE", help="a spec, training recipe or ablation recipe (YAML), or a shipped name")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="per-layer stages, parameters (active per token), state size and FLOPs of a spec")
    p.add_argument("spec", metavar="SPEC", help="zoo name, spec YAML, a recipe (e.g. a run's config.yaml) or a run directory")
    p.add_argument("--context", type=int, default=2048, help="context length for attention FLOPs (default 2048)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("schema", help="JSON Schema of the model spec (for editor completion)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("train", help="train a model from a recipe (no recipe: the MQAR quick start)")
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML or shipped recipe name (default: quickstart)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field, e.g. --set optimizer.lr=3e-4 (repeatable)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", choices=["auto"], help="auto: continue the run in the output directory from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.add_argument("--nproc", type=int, metavar="N", help="run under torchrun with N processes (GPUs) on this machine; "
                   "the recipe's parallel: {sequence: S, data: D, strategy: ddp|fsdp|hsdp} splits them "
                   "(default: data = N, ddp); several machines: torchrun itself (docs/parallel.md)")
    p.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT", help="start a new run from these weights (a run directory: "
                   "its newest verified checkpoint, or its init checkpoint; a checkpoint/step-N/ or checkpoint/init/ folder; or a "
                   "model.safetensors) with a fresh optimizer, e.g. an lcsm upcycle output")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "upcycle",
        help="turn a dense run into a mixture-of-experts run (LLaMA-MoE-v2): its GLU neurons split into experts",
        description="Split every layer's dense GLU into E experts (and an optional shared expert) with a top-k router, "
        "optionally group the heads of every mixer into attention experts, and write an ordinary run directory "
        "(config.yaml, an init checkpoint in checkpoint/init/, upcycle.json) to post-train with lcsm train OUT/config.yaml --init-from OUT. "
        "See docs/upcycling.md.",
    )
    p.add_argument("run", metavar="RUN", help="the dense run directory (its newest verified checkpoint), or one checkpoint/step-N/ folder")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="routed experts per layer; must divide the GLU's neurons (less --shared)")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token, 1..E")
    p.add_argument("--out", required=True, metavar="NEW_RUN", help="the new run directory")
    p.add_argument("--split", default="clustering", metavar="HOW",
                   help="how the neurons are partitioned: random, clustering (balanced k-means of the gate vectors; default), "
                   "importance (LLaMA-MoE-v2: token clusters of the run's data and each neuron's importance to them)")
    p.add_argument("--importance", default="gradient", metavar="MEASURE",
                   help="--split importance: gradient (|a·∂L/∂a|, default) or activation (|a|)")
    p.add_argument("--batches", type=int, default=8, metavar="N", help="--split importance: training batches to measure on (default 8)")
    p.add_argument("--shared", type=int, default=0, metavar="N", help="neurons kept in an always-on shared expert (default 0)")
    p.add_argument("--scale", type=float, metavar="S", help="multiplies the routed experts' weighted sum (default E: exact at top-k = E)")
    p.add_argument("--router", default="centroid", metavar="INIT", help="router init: centroid (default), zero (uniform), random")
    p.add_argument("--attention-experts", type=int, metavar="G", help="also group every mixer's heads into G attention experts")
    p.add_argument("--attention-top-k", type=int, metavar="K", help="head groups per token, 1..G (with --attention-experts)")
    p.add_argument("--attention-scale", type=float, metavar="S", help="multiplies the head groups' weights (default G)")
    p.add_argument("--aux-loss-weight", type=float, metavar="W", help="the routers' balancing-loss weight (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="the random split, k-means seeding and random router init (default 0)")
    p.add_argument("--device", default="auto", help="where --split importance runs the model: auto, cpu, cuda, ... (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace lcsm's files in an existing NEW_RUN")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint: accuracy per slice, or loss, perplexity and bits per byte")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory, its checkpoint/ folder, one checkpoint/step-N/ folder or a model.safetensors")
    p.add_argument("--task", metavar="TASK", help="another task: a task YAML or a shipped task name (recipes/tasks)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a task field, e.g. --set test.0.num_examples=500")
    p.add_argument("--batch-size", type=int, help="default: the recipe's eval batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("-o", "--output", help="JSON file (default RUN/eval/test.json, RUN/eval/TASK.json with --task, "
                   "RUN/eval/lm_eval.json with --lm-eval)")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks instead, comma-separated (e.g. "
                   "lambada_openai,piqa,hellaswag,arc_easy); results go to RUN/eval/lm_eval.json, beside eval.json")
    p.add_argument("--limit", type=int, metavar="N", help="with --lm-eval: at most N examples per task")
    p.add_argument("--lm-eval-include", action="append", metavar="DIR", help="with --lm-eval: a folder of task YAMLs (local tasks)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a trained run: prefill the prompt, then constant-cost steps (streams text)")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory, its checkpoint/ folder, one checkpoint/step-N/ folder or a model.safetensors")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text, encoded with the run's tokenizer (text runs)")
    prompt.add_argument("--tokens", metavar="ID,ID,...", help="the prompt as token ids (any run, e.g. MQAR)")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens at most (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--greedy", action="store_true", help="always the most likely token (same as --temperature 0)")
    p.add_argument("--eos-token", type=int, help="stop after this token id (end of text)")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")
    p.add_argument("--quiet-prompt", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, launch each step's kernels instead of replaying a captured graph")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="corpora: tokenise text, JSONL and Parquet into memory-mapped shards (kind: corpus)")
    data = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    d = data.add_parser("prepare", help="tokenise sources into a corpus directory: shards, document index, manifest")
    d.add_argument("sources", nargs="+", metavar="SOURCE", help="text files, folders (recursively), .jsonl and .parquet files")
    d.add_argument("--tokenizer", default="bytes", help="bytes (default), bpe:PATH (an lcsm BPE tokenizer.json), bpe:N (train N "
                   "tokens on the sources) or hf:PATH (a Hugging Face tokenizer.json, or a folder holding one)")
    d.add_argument("--out", required=True, metavar="DIR", help="the corpus directory to write")
    d.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation (default 0.01)")
    d.add_argument("--text-key", default="text", help="the field of a JSONL record / Parquet column with the text (default text)")
    d.add_argument("--eos", metavar="TOKEN", help="the document separator among the tokenizer's tokens (default: its EOS, else one id appended)")
    d.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard before the next one starts (default 2^27)")
    d.add_argument("--overwrite", action="store_true", help="replace a corpus already in DIR")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_data_prepare)
    d = data.add_parser("info", help="a corpus's counts and tokenizer; --verify checks every shard's sha256")
    d.add_argument("path", metavar="DIR")
    d.add_argument("--verify", action="store_true", help="read every shard and compare its sha256 with the manifest")
    d.set_defaults(func=cmd_data_info)

    p = sub.add_parser("export", help="write a run for other tools: a Hugging Face transformers folder (--hf) or the weights (--out)")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory, its checkpoint/ folder, one checkpoint/step-N/ folder or a model.safetensors")
    p.add_argument("--hf", metavar="DIR", help="config.json, model.safetensors and the tokenizer, for AutoModelForCausalLM.from_pretrained(DIR)")
    p.add_argument("--out", metavar="FILE.safetensors", help="the model's weights as one safetensors file (a sharded run's too)")
    p.add_argument("--overwrite", action="store_true", help="replace what is there")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="PNG of the loss and accuracy curves of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (overlaid)")
    p.add_argument("-o", "--output", help="a .png (or .pdf, .svg) file (default RUN/curves.png for one run, curves.png for several)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "ablate",
        help="run a grid of training runs (an ablation recipe) and report results.csv, results.md and plots",
        description="Expand an ablation recipe (recipes/ablations) into training runs, run the unfinished ones "
        "(resumable; failures recorded, the grid goes on; one worker process per GPU, --jobs per GPU) and "
        "write OUT/<name>/results.csv, results.md and a PNG. See docs/ablations.md.",
    )
    p.add_argument("recipes", nargs="*", metavar="RECIPE", help="ablation YAML or shipped name (recipes/ablations); several share one worker pool")
    p.add_argument("--out", metavar="DIR", help="parent of the ablation directories (default ./ablations): DIR/<name>/")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes per GPU (or on the CPU); default 1")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a field of the base recipe for every point, e.g. --set steps=200")
    p.add_argument("--grid", action="append", metavar="AXIS=VALUES", help="replace an axis, e.g. --grid model.d_model=[64,128]; for a named axis the labels to keep")
    p.add_argument("--seeds", type=_seeds, metavar="S1,S2", help="replace the seeds, e.g. --seeds 0,1,2")
    p.add_argument("--reduced", action="store_true", help="apply the recipe's reduced: section (the smaller GPU grid)")
    p.add_argument("--dry-run", action="store_true", help="list every point (validated) and its status; train nothing")
    p.add_argument("--report", nargs="+", metavar="DIR", help="rebuild results.csv, results.md and the plot of ablation directories")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("bench", help="benchmarks (GPU; --small sizes and bench mom --table run on a CPU)")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, module, text in BENCHMARKS:
        b = what.add_parser(name, help=text)
        mod = importlib.import_module(f"lcsm.bench.{module}")
        mod.add_arguments(b)
        b.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (SpecError, UsageError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
