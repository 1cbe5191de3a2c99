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

from lcsm.config.base import SpecError
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

    with _meta_device():
        return Model(spec)


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


def cmd_validate(args) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = load_model_spec(path)
            params = build_meta(spec).num_parameters()
            out.print(f"[green]ok[/green]      {escape(path)}  ({escape(spec.name or 'unnamed')}, {_si(params)} parameters)")
        except SpecError as e:
            failed += 1
            err.print(f"[red]invalid[/red] {escape(path)}\n{escape(str(e))}")
    return 2 if failed else 0


def cmd_show(args) -> int:
    spec = load_model_spec(args.spec)
    model = build_meta(spec)
    rows = model.summary(context=args.context)
    out.print(f"[bold]{escape(spec.name or args.spec)}[/bold]: {escape(spec.description or '')}".rstrip(": "))
    for name, text in describe_stages(spec).items():
        out.print(f"  {name:<12} {escape(text)}")
    if isinstance(spec.mixer, EOSMixer):
        H, K, V = spec.mixer.dims(spec.d_model, spec.n_heads)
        out.print(f"  {'heads':<12} H={H}  K={K}  V={V}")
    for name, mixer in spec.mixers.items():
        text = describe_stages(spec.model_copy(update={"mixer": mixer}))
        out.print(f"  {name:<12} " + escape(" · ".join(f"{k} {v}" for k, v in text.items())))
    if spec.pattern:
        out.print(f"  {'pattern':<12} {' '.join(spec.pattern)} (× {spec.n_layers // len(spec.pattern)})")
    channel = spec.channel_mixer.describe()
    if channel:
        out.print(f"  {'channel':<12} {escape(channel)}")
    table = Table(title_justify="left")
    for col in ("layer", "mixer", "parameters", "state size", "FLOPs/token"):
        table.add_column(col, justify="right" if col != "mixer" else "left")
    for r in rows:
        state = f"{_si(r.state_size)} per token" if r.state_grows else _si(r.state_size)
        table.add_row(str(r.index), r.mixer, _si(r.parameters), state, _si(r.flops_per_token))
    out.print(table)
    embed = spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)
    out.print(
        f"total {_si(model.num_parameters())} parameters ({_si(embed)} in embeddings"
        f"{', tied' if spec.tie_embeddings else ''}); state sizes count numbers per sequence"
        + (f"; attention FLOPs at context {args.context}" if any(r.state_grows for r in rows) else "")
    )
    return 0


def cmd_schema(args) -> int:
    from lcsm.config.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        out.print(f"wrote {args.output}")
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
        result = train(recipe, resume=args.resume == "auto", overwrite=args.overwrite, console=out)
    except TrainingError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 1
    if _distributed_rank() > 0:
        return 0  # rank 0 reports
    run = escape(str(result.run_dir))
    if result.status == "interrupted":
        again = shlex.join(["lcsm", "train"] + ([args.recipe] if args.recipe else []) + [a for s in args.set or [] for a in ("--set", s)])
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # started by torchrun (e.g. through --nproc): continue the same way
            again += f" --nproc {world}"
        err.print(
            f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {run}/checkpoint. "
            f"Continue with: {escape(again)} --resume auto"
        )
        return 130
    how = "stopped early: eval accuracy reached the early_stop target" if result.status == "early_stop" else "done"
    m = result.eval
    out.print(_result_table(m, f"{recipe.name or 'run'}: test results at step {result.step} ({how}, {result.elapsed_s:.0f}s training)"))
    headline = (
        f"bits per byte {m['bits_per_byte']:.3f}, perplexity {m['perplexity']:.2f}"
        if "bits_per_byte" in m
        else f"test accuracy {m['accuracy']:.3f}"
    )
    out.print(f"[bold]{headline}[/bold]. Run: {run}  (lcsm eval {run} · lcsm plot {run})")
    return 0


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
    if par.sequence * par.data == 1:
        sets.append(f"parallel.data={n}")  # no grid in the recipe: plain data parallelism
    elif par.sequence * par.data != n:
        raise UsageError(
            f"--nproc {n} does not match the recipe's parallel: sequence × data = {par.sequence} × {par.data}; "
            f"use --nproc {par.sequence * par.data} or --set parallel.data=..."
        )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "lcsm.cli", "train"]
    cmd += [args.recipe] if args.recipe else []
    cmd += [a for x in sets for a in ("--set", x)]
    cmd += ["--resume", "auto"] if args.resume else []
    cmd += ["--overwrite"] if args.overwrite else []
    out.print(f"launching: {escape(shlex.join(cmd))}")
    from lcsm.parallel.grid import run_torchrun

    return run_torchrun(cmd)


def cmd_eval(args) -> int:
    from lcsm.run.device import resolve_device, resolve_precision
    from lcsm.run.evaluate import evaluate, load_run
    from lcsm.config.recipe import DEVICE, RecipeError, load_recipe, resolve_task
    from lcsm.tasks import TaskError, build_task

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if not DEVICE.match(args.device):
        raise UsageError(f"--device: unknown device '{args.device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    device = resolve_device(args.device)
    recipe, model, run_dir, step = load_run(args.run, device)
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
    metrics = evaluate(model, task, args.batch_size or recipe.eval_batch_size or recipe.batch_size, device, precision)
    report = {"run": str(run_dir), "step": step, "task": recipe.resolved()["task"], "metrics": metrics}
    path = Path(args.output) if args.output else run_dir / (f"eval-{Path(args.task).stem}.json" if args.task else "eval.json")
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot write the report ({e.strerror})") from None
    out.print(_result_table(metrics, f"{escape(str(run_dir))} at step {step}: {recipe.task.kind}"))
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
    recipe, model, run_dir, step = load_run(args.run, device)
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


def cmd_plot(args) -> int:
    from lcsm.run.plot import plot_runs

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
    table = Table(title=f"{grid.name}: {grid.report_metric}" + (f" at the best {key}" if key else ""), title_justify="left")
    for a in axes + ([f"best {key.split('.')[-1]}"] if key else []) + [grid.report_metric, "seeds"]:
        table.add_column(a, justify="right" if a in (grid.report_metric, "seeds") else "left")
    for s in summary:
        value = "-" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
        table.add_row(*[escape(s["labels"][a]) for a in axes], *([escape(str(s["best"] or "-"))] if key else []), value, str(s["n"]))
    return table


def _wrote(rep: dict) -> None:
    if rep["png"]:
        plot = f", {escape(str(rep['png']))}"
    elif rep["png_missing"]:
        plot = f" (no plot: {rep['png_missing']})"
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
            table = Table(title=f"{ab.grid.name}: {len(ab.points)} points -> {escape(str(ab.out_dir))}", title_justify="left")
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

    p = sub.add_parser("validate", help="check spec files; exit 2 if any is invalid")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="YAML file or zoo name")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="per-layer stages, parameters, state size and FLOPs of a spec")
    p.add_argument("spec", metavar="SPEC", help="YAML file or zoo name")
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
                   "the recipe's parallel: {sequence: S, data: D} splits them (default: data = N)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint: accuracy per slice, or loss, perplexity and bits per byte")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory, its checkpoint/ folder or a model.safetensors")
    p.add_argument("--task", metavar="TASK", help="another task: a task YAML or a shipped task name (recipes/tasks)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a task field, e.g. --set test.0.num_examples=500")
    p.add_argument("--batch-size", type=int, help="default: the recipe's eval batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("-o", "--output", help="JSON file (default RUN/eval.json, or RUN/eval-TASK.json with --task)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a trained run: prefill the prompt, then constant-cost steps (streams text)")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory, its checkpoint/ folder or a model.safetensors")
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

    p = sub.add_parser("plot", help="PNG of the loss and accuracy curves of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (overlaid)")
    p.add_argument("-o", "--output", help="PNG file (default RUN/curves.png for one run, curves.png for several)")
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
