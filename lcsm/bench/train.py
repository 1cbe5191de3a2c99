"""`lcsm bench train`: training throughput and peak memory of zoo models resized to one common
shape, side by side in one process: the trainer's one step (forward, backward, fused AdamW) under
bf16 autocast on the GPU; with `--compare fla`, fla's own models of the same width, depth and
heads (built from their Hugging Face configs), stepped with the same optimizer and autocast.

Defaults: d_model 1024, 12 layers, 8 heads, vocabulary 32000, at B×T = 8×2048, 2×8192 and 1×32768.
`--variants` runs each lcsm model several ways in the same process (eager; `compile`: its blocks
under torch.compile; `graphs`: compiled with CUDA graphs, mode "reduce-overhead"; `segments`: the
segment split of the state passes, LCSM_STATE_SEGMENTS=auto; joined with "+"), so that what a
switch buys is a ratio within one process, not between two.
"""

from __future__ import annotations

import argparse
import json

import torch

from lcsm.bench import common
from lcsm.bench.common import BenchError, resized
from lcsm.config.recipe import Compile, Optimizer, Schedule
from lcsm.config.spec import ModelSpec
from lcsm.kernels import state_segments
from lcsm.nn.model import Model
from lcsm.run.trainer import Trainer, make_optimizer

# resized (lcsm/bench/common.py) is re-exported: tests/parallel/test_parallel.py imports it from here
__all__ = ["add_arguments", "fla_config", "main", "measure", "parse_shapes", "resized", "run"]

# a benchmark times steps, so: a constant learning rate, no warmup, no clipping (one less reduction)
OPTIMIZER = Optimizer(lr=1e-4, grad_clip=None)
SCHEDULE = Schedule(kind="constant", warmup_steps=0)
DEFAULT_MODELS = ["gla", "retnet", "hgrn2", "mamba2", "linear_attention", "deltanet", "gated_deltanet", "transformer"]
DEFAULT_SHAPES = "8x2048,2x8192,1x32768"
# the ways to run one lcsm model (`--variants`; joined with "+", e.g. compile+segments)
VARIANT_PARTS = {
    "eager": {},
    "compile": {"compile": {}},
    "graphs": {"compile": {"mode": "reduce-overhead"}},  # a recipe's compile setting, as in the YAML
    "segments": {"state_segments": "auto"},
}


def parse_variant(name: str) -> dict:
    """'compile+segments' -> {"compile": {...}, "state_segments": "auto"}; BenchError naming what is allowed."""
    out: dict = {}
    for part in name.split("+"):
        if part not in VARIANT_PARTS:
            raise BenchError(f"--variants: {part!r} is not one of {', '.join(VARIANT_PARTS)} (join them with '+')")
        out.update(VARIANT_PARTS[part])
    return out


def _compile(setting: dict) -> Compile | None:
    return None if "compile" not in setting else Compile(**setting["compile"])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'8x2048,2x8192' -> [(8, 2048), (2, 8192)]."""
    shapes = []
    for part in text.split(","):
        b, sep, t = part.strip().lower().partition("x")
        if not sep or not b.isdigit() or not t.isdigit() or int(b) < 1 or int(t) < 2:
            raise BenchError(f"--shapes: '{part}' is not BxT with B >= 1 and T >= 2 (e.g. --shapes 8x2048,2x8192)")
        shapes.append((int(b), int(t)))
    return shapes


def fla_config(name: str, d: int, layers: int, heads: int, vocab: int):
    """fla's model config of the same width, depth and heads as lcsm's `name` (None when fla has no
    counterpart or is not installed). Everything else is fla's default. fla's Mamba2 is left out:
    its layer runs its fast path only with the mamba-ssm CUDA package (else a naive loop), so a
    comparison without it would measure that loop."""
    try:
        import fla.models as fm
    except Exception:  # not installed, or not importable with this Triton
        return None
    common_args = dict(hidden_size=d, num_hidden_layers=layers, vocab_size=vocab)
    make = {
        "gla": lambda: fm.GLAConfig(num_heads=heads, **common_args),
        "retnet": lambda: fm.RetNetConfig(num_heads=heads, **common_args),
        "hgrn2": lambda: fm.HGRN2Config(num_heads=heads, expand_ratio=d // heads, **common_args),
        "linear_attention": lambda: fm.LinearAttentionConfig(num_heads=heads, feature_map="elu", **common_args),
        "deltanet": lambda: fm.DeltaNetConfig(num_heads=heads, **common_args),
        "gated_deltanet": lambda: fm.GatedDeltaNetConfig(num_heads=heads, head_dim=int(0.75 * d) // heads, expand_v=2,
                                                         **common_args),
        "kda": lambda: fm.KDAConfig(num_heads=heads, head_dim=d // heads, **common_args),
        "transformer": lambda: fm.TransformerConfig(num_heads=heads, **common_args),
    }.get(name)
    return None if make is None else make()


def _timed(step, steps: int, warmup: int, device: torch.device, profile: int, peak_from_start: bool = False) -> dict:
    """Mean ms of `steps` calls of step() after `warmup`, the peak memory of the timed calls (with
    peak_from_start: of the warm-up calls too), and with profile > 0 the per-kernel profile of that
    many further calls (common.kernel_profile)."""
    if peak_from_start:
        common.reset_peak(device)
    for _ in range(warmup):
        step()
    if not peak_from_start:
        common.reset_peak(device)
    out = {"ms_per_step": common.mean_ms(step, steps, device)}
    if device.type == "cuda":
        out["peak_GiB"] = common.peak_gib(device)
    if profile:
        out["profile"] = common.kernel_profile(step, profile, device)
    return out


def measure(spec: ModelSpec, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
            compile: Compile | None = None, profile: int = 0, state_segments_setting: str | None = None) -> dict:
    """Mean time of `steps` Trainer steps on random tokens [batch, seq] after `warmup` steps (and
    with profile > 0 the per-kernel profile of that many more). compile: a recipe's compile setting
    (None: eager); state_segments_setting: LCSM_STATE_SEGMENTS for this run."""
    with state_segments(state_segments_setting):
        return _measure(spec, batch, seq, steps, warmup, device, compile, profile)


def _measure(spec, batch, seq, steps, warmup, device, compile, profile) -> dict:
    torch.manual_seed(0)
    model = Model(spec).to(device)
    if compile is not None:
        model.compile_blocks(dynamic=False, **compile.options())
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainer = Trainer(model, OPTIMIZER, SCHEDULE, warmup + steps, device=device, precision=precision)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # next-token prediction
    losses = []

    def step():
        losses.append(trainer.step(inputs, labels).loss)

    # CUDA graphs keep their memory in a pool taken while recording (in the warm-up): a peak of
    # the timed steps alone would leave it out
    graphs = compile is not None and compile.graphs
    out = _timed(step, steps, warmup, device, profile, peak_from_start=graphs)
    return {"params_M": model.num_parameters() / 1e6, "tokens_per_s": batch * seq / (out["ms_per_step"] / 1e3),
            "loss": losses[-1], **out}


def measure_fla(config, batch: int, seq: int, steps: int, warmup: int, device: torch.device, profile: int = 0) -> dict:
    """The same timing for an fla model: its own forward with labels (its fused loss), backward,
    and the fused AdamW of lcsm's trainer, under the same bf16 autocast. This loop is the baseline's
    step, not lcsm's."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    opt = make_optimizer(model, OPTIMIZER, fused=device.type == "cuda")
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=tokens, labels=tokens).loss  # fla shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    out = _timed(step, steps, warmup, device, profile)
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_s": batch * seq / (out["ms_per_step"] / 1e3), "loss": losses[-1], **out}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SPEC",
                   help=f"zoo names or spec files (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"B×T of each run (default {DEFAULT_SHAPES})")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compare", choices=["fla"], help="fla: also fla's models of the same size, with ratios")
    p.add_argument("--compile", action="store_true", help="torch.compile lcsm's blocks (Model.compile_blocks); "
                                                           "the same as --variants compile")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="run each lcsm model these ways in the same process: " + ", ".join(VARIANT_PARTS)
                        + ", or several joined with '+' (default: eager, or compile with --compile)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N more steps of every model with torch.profiler: device time per kind of "
                        "kernel (GEMM, recurrence, norms, ...) side by side, and each model's longest kernels")
    p.add_argument("--json", help="write the results here")


def _ratio(a: dict, b: dict | None, key: str, fmt: str = ".2f") -> str:
    if b is None or key not in a or key not in b or not b[key]:
        return "—"
    return format(a[key] / b[key], fmt)


def run(args) -> int:
    common.positive(args, "d_model", "layers", "heads", "vocab", "steps")
    common.non_negative(args, "warmup", "profile")
    shapes = parse_shapes(args.shapes)
    if args.json:
        common.check_json_path(args.json)
    specs = [resized(name, args.d_model, args.layers, args.heads, args.vocab) for name in args.models]  # all checked first
    if args.variants and args.compile:
        raise BenchError("--compile and --variants: give one (--variants compile is --compile)")
    variants = args.variants or (["compile"] if args.compile else ["eager"])
    settings = {v: parse_variant(v) for v in dict.fromkeys(variants)}
    device = common.require_cuda("lcsm bench train", "on the CPU, `lcsm train` reports tokens/s")
    env = common.environment(device)
    print(json.dumps(env), flush=True)
    rows = []
    for batch, seq in shapes:
        for spec in specs:
            for variant, setting in settings.items():
                run_one = (lambda spec=spec, setting=setting: measure(
                    spec, batch, seq, args.steps, args.warmup, device, _compile(setting), args.profile,
                    setting.get("state_segments")))
                row = {"model": spec.name, "impl": "lcsm", "variant": variant, "B": batch, "T": seq,
                       **common.guard(run_one, catch_all=True)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                common.free_cache(device)
                if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                    common.write_json(args.json, {"env": env, "args": common.arguments(args), "rows": rows})
            config = fla_config(spec.name, args.d_model, args.layers, args.heads, args.vocab) if args.compare else None
            if config is not None:
                row = {"model": spec.name, "impl": "fla", "B": batch, "T": seq,
                       **common.guard(lambda: measure_fla(config, batch, seq, args.steps, args.warmup, device, args.profile), catch_all=True)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                common.free_cache(device)
                if args.json:
                    common.write_json(args.json, {"env": env, "args": common.arguments(args), "rows": rows})
    print("\n" + table(rows))
    if args.profile:
        print("\n" + profiles(rows))
    if args.json:
        common.write_json(args.json, {"env": env, "args": common.arguments(args), "rows": rows})
    return 0


def label(row: dict) -> str:
    """The model's name, with its variant when it is not the eager one: 'gla', 'gla [compile]'."""
    variant = row.get("variant", "eager")
    return row["model"] if variant == "eager" else f"{row['model']} [{variant}]"


def table(rows: list[dict]) -> str:
    """One line per (shape, model, variant): lcsm's numbers, fla's, the ratios lcsm/fla tokens/s
    and memory, and tokens/s against lcsm's transformer of the same variant (else the eager one)."""
    out = []
    for r in (r for r in rows if r["impl"] == "lcsm"):
        same = [x for x in rows if x["B"] == r["B"] and x["T"] == r["T"] and "tokens_per_s" in x]
        fla = next((x for x in same if x["model"] == r["model"] and x["impl"] == "fla"), None)
        bases = [x for x in same if x["model"] == "transformer" and x["impl"] == "lcsm"]
        base = next((x for x in bases if x.get("variant", "eager") == r.get("variant", "eager")),
                    next((x for x in bases if x.get("variant", "eager") == "eager"), None))
        if "tokens_per_s" not in r:
            out.append([f"{r['B']}×{r['T']}", label(r), "—", r.get("error", "—"), "—", "—", "—", "—", "—", "—"])
            continue
        out.append([
            f"{r['B']}×{r['T']}", label(r), f"{r['params_M']:.1f}", f"{r['tokens_per_s']:,.0f}", common.cell(r.get("peak_GiB"), ".1f"),
            "—" if fla is None else f"{fla['tokens_per_s']:,.0f}", "—" if fla is None else common.cell(fla.get("peak_GiB"), ".1f"),
            _ratio(r, fla, "tokens_per_s"), _ratio(r, fla, "peak_GiB"), _ratio(r, base, "tokens_per_s"),
        ])
    return common.markdown_table(["B×T", "model", "params (M)", "lcsm tok/s", "lcsm GiB", "fla tok/s", "fla GiB",
                                  "lcsm/fla tok/s", "lcsm/fla memory", "× lcsm transformer"], out)


def profiles(rows: list[dict], top: int = 12) -> str:
    """Per shape: the device time per kind of kernel of every profiled model side by side, then
    each model's `top` longest kernels."""
    out = []
    for shape in dict.fromkeys((r["B"], r["T"]) for r in rows):
        done = {f"{r['impl']} {label(r)}": r["profile"] for r in rows if (r["B"], r["T"]) == shape and "profile" in r}
        if not done:
            continue
        out += [f"### {shape[0]}×{shape[1]}: device time per step", "", common.profile_table(done), ""]
        for name_of, prof in done.items():
            out += [f"{name_of}, longest kernels (ms per step, launches per step):"]
            out += [f"  {ms:8.3f}  {calls:5.0f}×  [{kind}] {name[:100]}" for name, kind, ms, calls in prof["kernels"][:top]]
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    return common.main("lcsm bench train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
