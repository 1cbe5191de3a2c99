"""The scaffold every `lcsm bench NAME` shares.

    timers        do_bench_ms (triton.testing.do_bench median: CUDA events), Stopwatch and mean_ms
                  (host clock, synchronised at both ends), cuda_graph_ms (replayed CUDA graphs)
    profiles      kernel_profile(fn, steps, device): torch.profiler's per-kernel device time of
                  fn(), grouped by kind of kernel (profile_table prints it)
    memory        reset_peak, peak_gib (None off CUDA), free_cache
    environment   environment(device): date, GPU, torch, CUDA, triton, fla versions
    errors        BenchError (a SpecError: `lcsm` prints it and exits 2), at_least / positive /
                  non_negative checks that name the flag, require_cuda(what), guard(measure) for one row
    output        check_json_path / write_json, markdown_table, cell, arguments(args)
    models        resized(name, d_model, n_layers, n_heads, vocab): a zoo spec at another size;
                  validated(data, source): a changed spec, errors as BenchError
    command       main(prog, doc, add_arguments, run, argv): `python -m lcsm.bench.NAME`

A benchmark module keeps only what it measures: `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError

from lcsm.config.base import SpecError, format_errors
from lcsm.config.spec import ModelSpec, load_model_spec


class BenchError(SpecError):
    """Bad arguments or a machine that cannot run the benchmark; str() is the message for the user.
    A SpecError, so `lcsm` prints it without a traceback and exits 2."""


# --------------------------------------------------------------------------- arguments


def flag(name: str) -> str:
    """The command-line flag of an argparse destination: d_model -> --d-model."""
    return "--" + name.replace("_", "-")


def at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """BenchError naming the flag when args.<name> (an int, a list of ints, or None: not given)
    is below `minimum`, e.g. "--steps must be at least 1 (got 0)"."""
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if min(value, default=minimum) < minimum:
                raise BenchError(f"{flag(name)}: every value must be at least {minimum} (got {' '.join(map(str, value))})")
        elif value < minimum:
            raise BenchError(f"{flag(name)} must be at least {minimum} (got {value})")


def positive(args: argparse.Namespace, *names: str) -> None:
    at_least(args, 1, *names)


def non_negative(args: argparse.Namespace, *names: str) -> None:
    at_least(args, 0, *names)


def require_cuda(what: str, hint: str = "") -> torch.device:
    """The CUDA device, or a BenchError saying that `what` needs one (and `hint`: what to do instead)."""
    if not torch.cuda.is_available():
        raise BenchError(f"{what} needs a CUDA GPU, and none is visible on this machine" + (f"; {hint}" if hint else ""))
    return torch.device("cuda", torch.cuda.current_device())


def arguments(args: argparse.Namespace) -> dict:
    """The parsed arguments for a JSON record (the CLI's `func` left out)."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


# --------------------------------------------------------------------------- timers


def sync(device: torch.device | None) -> None:
    """Wait for the GPU (a no-op off CUDA): host-clock timings must not end before the work does."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def do_bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() from triton.testing.do_bench (CUDA events; it flushes the L2
    cache between calls). warmup and rep are milliseconds of calls, as do_bench takes them."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


class Stopwatch:
    """Host-clock seconds of a block, the device synchronised at both ends:

        with Stopwatch(device) as clock:
            ...
        clock.s, clock.ms
    """

    def __init__(self, device: torch.device | None = None):
        self.device, self.s = device, 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.s = time.perf_counter() - self._t0

    @property
    def ms(self) -> float:
        return self.s * 1e3


def mean_ms(fn: Callable[[], object], iters: int, device: torch.device | None, warmup: int = 0) -> float:
    """Mean milliseconds of fn() over `iters` calls after `warmup` untimed ones (host clock)."""
    for _ in range(warmup):
        fn()
    with Stopwatch(device) as clock:
        for _ in range(iters):
            fn()
    return clock.ms / iters


def cuda_graph_ms(fn: Callable[[], object], iters: int, per_graph: int = 16) -> float:
    """Milliseconds per fn() when `per_graph` calls are captured in one CUDA graph and replayed
    (what is left is the kernels' own time, without the launches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # torch wants a few runs on a side stream before a capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return mean_ms(graph.replay, max(1, iters // per_graph), torch.device("cuda"), warmup=3) / per_graph


# --------------------------------------------------------------------------- profiles

# Kinds of kernel, by name, in order: the first pattern that matches names the kind. The names are
# those the CUDA runtime reports: cuBLAS/cuBLASLt GEMMs (sm90_xmma, nvjet, cutlass), flash
# attention, lcsm's and fla's Triton recurrence kernels, Inductor's generated kernels (triton_),
# torch's own pointwise and reduction kernels, the optimizer's multi-tensor kernels.
KERNEL_KINDS = [
    ("gemm", r"gemm|xmma|nvjet|cutlass|wgmma|cublas|sm90_|sm80_|ampere_|hopper_"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("recurrence", r"chunk_|scan_|delta|wy_|recompute_w_u|solve_tril|_fwd_kernel|_bwd_kernel|fused_recurrent"),
    ("compiled", r"^triton_"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copy/cast", r"copy|memcpy|memset|fill|cat|index|gather|scatter|transpose|permute"),
    ("norm", r"norm"),
    ("pointwise/reduce", r"elementwise|vectorized|reduce|unrolled|softmax|cross_entropy|loss|sum|mul|add"),
]


def kernel_kind(name: str) -> str:
    """The kind of a kernel from its name (KERNEL_KINDS), "other" when no pattern matches."""
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, low)), "other")


def kernel_profile(fn: Callable[[], object], steps: int, device: torch.device, top: int = 20) -> dict:
    """Per-kernel device time of fn() from torch.profiler, averaged over `steps` calls (run fn a
    few times before, so that compilation and autotuning stay out).

    Returns {"ms": total device ms per call, "kinds": {kind: ms}, "kernels": [[name, kind, ms,
    calls per step], ...] (the `top` longest)}. On the CPU the times are the operators' own CPU
    times (no device kernels exist there): the same table, for a test."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if cuda else ev.self_cpu_time_total
        if cuda and getattr(ev, "device_type", None) is not None and str(ev.device_type) != "DeviceType.CUDA":
            continue  # the CPU-side operator events carry their kernels' time too: count kernels once
        if us > 0:
            rows.append([ev.key, kernel_kind(ev.key), us / steps / 1e3, ev.count / steps])
    rows.sort(key=lambda r: -r[2])
    kinds: dict[str, float] = {}
    for _, kind, ms, _ in rows:
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {"ms": sum(r[2] for r in rows), "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "kernels": rows[:top]}


def profile_table(profiles: dict[str, dict]) -> str:
    """Markdown: the time per kind of kernel of several profiles side by side ({label: kernel_profile})."""
    kinds = sorted({k for p in profiles.values() for k in p["kinds"]},
                   key=lambda k: -max(p["kinds"].get(k, 0.0) for p in profiles.values()))
    rows = [[kind] + [cell(p["kinds"].get(kind, 0.0), ".2f") for p in profiles.values()] for kind in kinds]
    rows.append(["**total**"] + [f"**{p['ms']:.2f}**" for p in profiles.values()])
    return markdown_table(["kind of kernel (ms per step)"] + list(profiles), rows)


# --------------------------------------------------------------------------- memory and failures


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The peak allocated GPU memory since the last reset_peak, GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guard(measure: Callable[[], dict], catch_all: bool = False) -> dict:
    """measure() -> dict, or {"error": "out of memory"}: one row that does not fit must not cost the
    others. catch_all: any other exception too ({"error": "Type: message"}, traceback on stderr)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except Exception as err:
        if not catch_all:
            raise
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {err}"}


# --------------------------------------------------------------------------- environment


def _distribution(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # not installed, or not importable here
        return None
    return getattr(module, "__version__", "?")


def environment(device: torch.device | None = None, **extra) -> dict:
    """Where a measurement was taken: date, GPU (None on the CPU), device (the GPU's name or
    "cpu"), torch, CUDA, triton, fla (the version of the `fla` package when one is installed) and
    the fla-core / flash-linear-attention distributions, Python; then `extra`."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else None
    fla_core, fla_full = _distribution("fla-core"), _distribution("flash-linear-attention")
    # found, not imported: importing fla takes seconds (bench kernels imports it when it runs it)
    fla = (fla_core or fla_full or "?") if importlib.util.find_spec("fla") is not None else None
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu,
        "device": gpu or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _module_version("triton"),
        "fla": fla,
        "fla_core": fla_core,
        "flash_linear_attention": fla_full,
        "python": platform.python_version(),
    }
    return {**env, **extra}


# --------------------------------------------------------------------------- output


def check_json_path(path: str, what: str = "--json") -> Path:
    """The path of a results file, checked before anything is measured: it ends in .json and its
    folder exists (a typo must not cost a GPU hour's results)."""
    p = Path(path)
    if p.suffix != ".json":
        raise BenchError(f"{what} {path}: the results file must end in .json")
    if not p.parent.is_dir():
        raise BenchError(f"{what} {path}: the folder {p.parent} does not exist")
    if p.is_dir():
        raise BenchError(f"{what} {path}: is a folder; give a file name ending in .json")
    return p


def write_json(path: str, data: dict) -> None:
    """Write `data` to `path` (through a temporary file: a run stopped while writing keeps the last
    complete file). Values JSON does not know (dtypes, tuples in keys) are written as str()."""
    p = check_json_path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, p)
    except OSError as err:
        raise BenchError(f"--json {path}: cannot write the results ({err.strerror})") from None


def cell(x, fmt: str = ".3f", missing: str = "—") -> str:
    """A table cell: a number formatted, None as `missing`, anything else (an error) as it is."""
    if x is None:
        return missing
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, fmt)
    return str(x)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A markdown table; the cells are written with str() (format them with cell())."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- models


def validated(data: dict, source: str) -> ModelSpec:
    """A ModelSpec from a dict a benchmark changed, or a BenchError that names `source`."""
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        raise BenchError(format_errors(err, data, source)) from None


def resized(name: str, d_model: int, n_layers: int, n_heads: int, vocab: int) -> ModelSpec:
    """A zoo spec (or spec file) at another size, validated again, so that a shape that does not
    fit is a clear error. An explicit per-mixer head count is dropped (n_heads decides)."""
    data = load_model_spec(name).model_dump(exclude_unset=True)
    data.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab)
    data.setdefault("mixer", {}).pop("heads", None)
    return validated(data, f"{name} at d_model {d_model}, {n_layers} layers, {n_heads} heads, vocabulary {vocab}")


# --------------------------------------------------------------------------- the command


def main(prog: str, doc: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """`python -m lcsm.bench.NAME`: the module's arguments and run, errors as `lcsm bench` prints them."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
