"""`lcsm bench mom`: one Mixture-of-Memories layer (dense and sparse paths) against the same mixer
with a single memory: forward, and forward + backward, of the token mixer alone.

Default shape: B = 8, T = 4096, d_model 2048, E = 4 memories, top-2, a shared memory,
bf16 autocast over fp32 weights and the mixer's input in bf16 (as `lcsm train` runs on the GPU;
before 2026-12-01's sixth session the input was fp32). `--small` is a tiny shape that
runs on the CPU in seconds (a smoke test of the command, not a measurement).
"""

from __future__ import annotations

import argparse
import json

import torch
from pydantic import ValidationError

from lcsm.bench import common
from lcsm.bench.common import BenchError
from lcsm.config.spec import ModelSpec, load_model_spec
from lcsm.nn.context import LayerContext
from lcsm.nn.mixers import build_mixer
from lcsm.nn.model import Model


def layer_spec(base: str, d_model: int, heads: int, routing: dict | None) -> ModelSpec:
    """The mixer of zoo spec `base` at this width, with a routing block (or none: one memory)."""
    data = load_model_spec(base).model_dump(exclude_unset=True)
    mixer = data["mixer"]
    mixer.pop("heads", None)
    mixer.pop("routing", None)
    if routing is not None:
        mixer["routing"] = routing
    data.update(d_model=d_model, n_layers=1, n_heads=heads)
    # e.g. --top-k above --memories, or a --model that cannot be routed
    return common.validated(data, f"lcsm bench mom --model {base}")


def time_layer(spec: ModelSpec, batch: int, seq: int, steps: int, warmup: int, device, dtype, profile: int = 0) -> dict:
    """Mean ms of the token mixer's forward (no grad) and of its forward + backward (gradients of
    x [batch, seq, d_model] and of the weights), on the host clock; with profile > 0 also the
    per-kernel device time of that many more forward + backward calls (common.kernel_profile)."""
    torch.manual_seed(0)
    ctx = LayerContext(spec.d_model, spec.n_heads, layer_idx=0, n_layers=1, norm_eps=spec.norm_eps)
    mixer = build_mixer(spec.mixer, ctx).to(device)
    mixer.apply(Model._init)
    # in the autocast dtype, as a block hands its mixer the normed input (lcsm/nn/model.py,
    # _compute_dtype); an fp32 x would make every gather and copy of the sparse path twice as large
    x = torch.randn(batch, seq, spec.d_model, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(batch, seq, spec.d_model, device=device, dtype=dtype)

    def amp():  # bf16 autocast over fp32 weights, as `lcsm train` runs on the GPU
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.no_grad(), amp():
            return mixer(x)

    def forward_backward():
        with amp():
            y = mixer(x)
        y.backward(dy.to(y.dtype))
        x.grad = None
        mixer.zero_grad(set_to_none=True)

    out = {"fwd_ms": common.mean_ms(forward, steps, device, warmup),
           "fwd_bwd_ms": common.mean_ms(forward_backward, steps, device, warmup)}
    if device.type == "cuda":
        common.reset_peak(device)
        forward_backward()
        out["peak_GiB"] = common.peak_gib(device)
    if profile:
        out["profile"] = common.kernel_profile(forward_backward, profile, device)
    return out


def run_row(run: str) -> dict:
    """One finished `lcsm train` run (e.g. runs/mqar_mom_256): model, memories, test accuracy, time."""
    from pathlib import Path

    import yaml

    from lcsm.run.evaluate import read_eval

    d = Path(run)
    try:
        record = read_eval(d / "eval.json")  # the one reader of eval files: every layout lcsm has written
        ev = {**record.metrics, "step": record.step} if record is not None else json.loads((d / "eval.json").read_text())
        lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        cfg = yaml.safe_load((d / "config.yaml").read_text())
    except (OSError, ValueError) as err:
        raise BenchError(f"lcsm bench mom --table: {run}: not a finished run ({err})") from None
    try:
        spec = ModelSpec.model_validate(cfg["model"])
        ev["accuracy"], ev["loss"]  # noqa: B018 - an MQAR run's eval.json has both
    except (KeyError, TypeError, ValidationError) as err:
        raise BenchError(f"lcsm bench mom --table: {run}: not a finished MQAR run ({type(err).__name__}: {err})") from None
    r = spec.mixer.routing
    train = [line for line in lines if line.get("split") == "train"]
    aux = [line["aux_loss"] for line in train if "aux_loss" in line]
    with torch.device("meta"):  # counts the parameters without allocating them
        params = Model(spec).num_parameters()
    return {
        "run": d.name, "model": spec.name, "d_model": spec.d_model,
        "memories": f"{r.memories}, top-{r.top_k}{' + shared' if r.shared else ''}" if r else "1",
        "params_M": params / 1e6, "steps": ev.get("step"),
        "accuracy": ev["accuracy"], "loss": ev["loss"],
        "slices": {k: v["accuracy"] for k, v in ev.get("slices", {}).items()},
        "train_s": train[-1].get("elapsed_s") if train else None, "final_aux_loss": aux[-1] if aux else None,
    }


def table(runs: list[str], json_path: str | None) -> int:
    """The MQAR comparison of finished runs as a markdown table (no GPU needed)."""
    rows = [run_row(r) for r in runs]
    columns = ["run", "model", "memories", "d_model", "params (M)", "steps", "test accuracy", "test loss", "train s",
               "final aux loss"]
    print(common.markdown_table(columns, [
        [r["run"], r["model"], r["memories"], r["d_model"], f"{r['params_M']:.2f}", r["steps"], f"{r['accuracy']:.3f}",
         f"{r['loss']:.3f}", common.cell(r["train_s"], ".0f"), common.cell(r["final_aux_loss"], ".4f")]
        for r in rows
    ]))
    if json_path:
        common.write_json(json_path, {"runs": rows})
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gla", metavar="SPEC",
                   help="zoo name or spec file whose mixer is routed (default gla: vector_k decay); a routing block in it is replaced")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8, help="heads (default 8: K = 128, V = 256 for gla)")
    p.add_argument("--memories", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--no-shared", action="store_true", help="no shared memory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (default bf16; fp32 on the CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--small", action="store_true", help="a tiny shape for the CPU: B=2, T=128, d_model 64, 2 heads, fp32")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N more forward + backward calls of every layer with torch.profiler: device "
                        "time per kind of kernel side by side, and each layer's longest kernels")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--table", nargs="+", metavar="RUN",
                   help="instead of timing: the MQAR comparison table of finished runs (e.g. runs/mqar_mom_256 runs/mqar_mom_single_256)")


def run(args) -> int:
    if args.json:
        common.check_json_path(args.json)
    if args.table:
        return table(args.table, args.json)
    common.positive(args, "batch", "seq", "d_model", "heads", "memories", "top_k", "steps")
    common.non_negative(args, "warmup", "profile")
    if args.small:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.batch, args.seq, args.d_model, args.heads, args.steps, args.warmup = 2, 128, 64, 2, 2, 1
    else:
        device = common.require_cuda("lcsm bench mom at the default shape", "use --small on the CPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    shared = not args.no_shared
    routing = {"memories": args.memories, "top_k": args.top_k, "shared": shared}
    env = common.environment(device, dtype=str(dtype).replace("torch.", ""),
                             shape={"B": args.batch, "T": args.seq, "d_model": args.d_model, "heads": args.heads},
                             routing=routing)
    print(json.dumps(env), flush=True)
    configs = [("single memory", None)] + [(f"MoM {path}", {**routing, "path": path}) for path in ("dense", "sparse")]
    specs = [(label, layer_spec(args.model, args.d_model, args.heads, r)) for label, r in configs]  # all checked first
    rows = []
    for label, spec in specs:
        row = {"layer": label, **common.guard(lambda spec=spec: time_layer(spec, args.batch, args.seq, args.steps, args.warmup, device, dtype,
                                                                         args.profile))}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        common.free_cache(device)
    base = rows[0] if "fwd_bwd_ms" in rows[0] else None
    budget = (args.top_k + int(shared)) * 1.2  # the issue's bar: (k + shared) memories' work, plus 20%
    print(f"\n{args.model}, B={args.batch} T={args.seq} d_model={args.d_model} heads={args.heads}, "
          f"E={args.memories} top-{args.top_k}{' + shared' if shared else ''}, {env['dtype']}, {env['device']}")
    table_rows = []
    for r in rows:
        if "fwd_bwd_ms" not in r:
            table_rows.append([r["layer"], "—", "—", r["error"], "—", "—"])
            continue
        if base:
            r["fwd_ratio"], r["fwd_bwd_ratio"] = r["fwd_ms"] / base["fwd_ms"], r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        table_rows.append([r["layer"], f"{r['fwd_ms']:.2f}", common.cell(r.get("fwd_ratio"), ".2f"), f"{r['fwd_bwd_ms']:.2f}",
                           common.cell(r.get("fwd_bwd_ratio"), ".2f"), common.cell(r.get("peak_GiB"), ".1f")])
    print(common.markdown_table(["layer", "fwd ms", "× single", "fwd+bwd ms", "× single", "peak GiB"], table_rows))
    sparse = rows[2]
    if base and "fwd_bwd_ratio" in sparse:
        verdict = "within" if sparse["fwd_bwd_ratio"] <= budget else "over"
        print(f"\nsparse fwd+bwd = {sparse['fwd_bwd_ratio']:.2f}× single: {verdict} the budget (k + shared)·1.2 = {budget:.1f}×")
    done = {r["layer"]: r["profile"] for r in rows if "profile" in r}
    if done:
        print("\nforward + backward, device time per call\n\n" + common.profile_table(done))
        for label, prof in done.items():
            print(f"\n{label}, longest kernels (ms per call, launches per call):")
            print("\n".join(f"  {ms:8.3f}  {calls:5.0f}×  [{kind}] {name[:100]}" for name, kind, ms, calls in prof["kernels"][:16]))
    if args.json:
        common.write_json(args.json, {"env": env, "args": common.arguments(args), "budget_ratio": budget, "rows": rows})
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench mom", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
