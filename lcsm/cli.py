"""The `lcsm` command line."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lcsm.spec import EOSMixer, ModelSpec, SpecError, load_model_spec

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

    osc = m.oscillation
    o = [osc.kind]
    if hasattr(osc, "source"):
        o.append(osc.source)
        if osc.source == "fixed":
            o.append(f"{osc.slopes} slopes")
        else:
            o.append(osc.parametrization + (f" τ={osc.tau:g}" if osc.parametrization == "sigmoid_tau" else ""))
    elif osc.kind == "rotation":
        o.append(f"θ {osc.theta}")
    elif osc.kind == "cumsoftmax":
        o.append(f"along {osc.along}")
    i = [m.input.feature_map] + ([f"conv{m.input.conv}"] if m.input.conv else []) + (["×Δ"] if m.input.scale_by == "dt" else [])
    return {"input": " ".join(i), "expand": key(m.expand), "oscillation": " ".join(o), "shrink": key(m.shrink)}


@contextmanager
def _meta_device():
    # Building on the meta device counts parameters without allocating them.
    import torch

    with torch.device("meta"):
        yield


def build_meta(spec: ModelSpec):
    from lcsm.model import Model

    with _meta_device():
        return Model(spec)


# --------------------------------------------------------------------------- commands


def cmd_zoo(args) -> int:
    from lcsm.zoo import zoo_paths

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
    from lcsm.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        out.print(f"wrote {args.output}")
    else:
        print(text)
    return 0


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
