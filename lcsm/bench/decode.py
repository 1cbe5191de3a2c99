"""`lcsm bench decode`: the cost of one generated token against the context length.

Two parts, in one process:

1. Models. For each model (default: gla, an EOS model, and transformer, softmax attention with a
   KV cache, resized to one common shape) and each context length: prefill random tokens with the
   chunked kernel (attention: FlashAttention through SDPA), then time `--steps` greedy one-token
   steps. Reports ms/token, tokens/s, the cache size and the peak memory while decoding. On CUDA
   the EOS model's step is replayed from a CUDA graph (`--no-cuda-graph` to launch eagerly); the
   attention model cannot be graphed (its KV cache grows) and runs eagerly.
2. One layer's step at B=8, H=16, K=V=128 (the issue's bar: <= 0.03 ms on an H200): the fused
   Triton step eagerly and replayed from a CUDA graph, the torch step, a whole one-layer model
   step, and SDPA over a KV cache at 1K/16K/64K for comparison.

`--small` runs a tiny version on the CPU (a smoke test of the command); the default sizes need a
GPU, unless `--device cpu` asks for them on the CPU anyway.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from lcsm.bench import common
from lcsm.bench.common import BenchError, resized
from lcsm.kernels import eos_step
from lcsm.nn.cache import cache_bytes
from lcsm.nn.generate import Decoder, supports_cuda_graph
from lcsm.nn.model import Model

# --------------------------------------------------------------------------- models


def decode_row(model, name: str, context: int, batch: int, steps: int, warmup: int, cuda_graph: bool, device) -> dict:
    """Prefill `context` random tokens [batch, context], then time `steps` greedy one-token steps."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model.spec.vocab_size, (batch, context), generator=gen).to(device)
    graph = cuda_graph and device.type == "cuda" and supports_cuda_graph(model)
    decoder = Decoder(model, cuda_graph=graph, max_len=context + warmup + steps + 1)
    common.free_cache(device)
    common.reset_peak(device)
    with common.Stopwatch(device) as prefill:
        logits = decoder.prefill(tokens)
    row = {"model": name, "context": context, "batch": batch, "cuda_graph": graph, "prefill_s": prefill.s}
    if device.type == "cuda":
        row["prefill_peak_GiB"] = common.peak_gib(device)
    nxt = logits.argmax(-1)

    def step():
        nonlocal nxt
        nxt = decoder.step(nxt).argmax(-1)

    for _ in range(warmup):  # (the CUDA graph is captured at the first step)
        step()
    common.reset_peak(device)
    ms = common.mean_ms(step, steps, device)
    row.update(ms_per_token=ms, tokens_per_s=batch / (ms / 1e3), cache_MiB=cache_bytes(decoder.cache) / 2**20)
    if device.type == "cuda":
        row["decode_peak_GiB"] = common.peak_gib(device)
    return row


def bench_model(name: str, args, device, dtype) -> list[dict]:
    """Every batch size and context of one model (its rows printed as they come)."""
    spec = resized(name, args.d_model, args.layers, args.heads, args.vocab)
    label = spec.name or name
    torch.manual_seed(0)
    model = Model(spec).to(device=device, dtype=dtype).eval()
    params = model.num_parameters()
    graph = not args.no_cuda_graph
    rows = []
    for batch in args.batch:
        # untimed: compiles (and autotunes) the kernels, so no row's prefill time includes that
        common.guard(lambda batch=batch: decode_row(model, label, min(args.contexts), batch, 2, 1, graph, device), catch_all=True)
        for context in args.contexts:
            def attempt(graph, batch=batch, context=context):
                with torch.no_grad():
                    return decode_row(model, label, context, batch, args.steps, args.warmup, graph, device)

            where = {"model": label, "context": context, "batch": batch}
            row = {**where, **common.guard(lambda: attempt(graph), catch_all=True)}
            if "error" in row and graph and device.type == "cuda" and supports_cuda_graph(model):
                # say so, and measure it without the graph
                row = {**where, **common.guard(lambda: attempt(False), catch_all=True), "graph_error": row["error"]}
            row["params_M"] = params / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
            common.free_cache(device)
    return rows


def bench_models(args, device, dtype) -> list[dict]:
    rows = []
    for name in args.models:
        rows += bench_model(name, args, device, dtype)  # the model is freed when bench_model returns
        common.free_cache(device)
    return rows


# --------------------------------------------------------------------------- one layer's step


def step_timings(fn, iters: int, device, graph: bool) -> dict:
    """eager_ms of fn() (host clock, mean of `iters`), and graph_ms replayed from a CUDA graph."""
    out = common.guard(lambda: {"eager_ms": common.mean_ms(fn, iters, device, warmup=3)}, catch_all=True)
    if graph and device.type == "cuda":
        out.update(common.guard(lambda: {"graph_ms": common.cuda_graph_ms(fn, iters)}, catch_all=True))
    return out


def sdpa_row(L: int, B: int, H: int, K: int, V: int, randn, args, device) -> dict:
    """Softmax attention of one query per sequence over a KV cache of L tokens."""
    q, kc, vc = randn(B, H, 1, K), randn(B, H, L, K), randn(B, H, L, V)

    def attend():
        F.scaled_dot_product_attention(q, kc, vc)

    return {"what": f"SDPA decode, KV cache {L}", "backend": "sdpa", "shape": [B, H, K, V],
            **step_timings(attend, args.step_iters, device, graph=True)}


def bench_step(args, device) -> list[dict]:
    B, H, K, V = args.step_shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    s, e, i = randn(B, H, K) * K**-0.5, randn(B, H, K), randn(B, H, V)
    forms = {"vector_k": {"gk": F.logsigmoid(randn(B, H, K, dt=torch.float32)) / 16},
             "scalar": {"g": F.logsigmoid(randn(B, H, dt=torch.float32)) / 16}}
    rows = []
    for form, gates in forms.items():
        state = torch.zeros(B, H, K, V, device=device)
        for backend in (["triton", "torch"] if device.type == "cuda" else ["torch"]):
            def one(backend=backend, gates=gates, state=state):
                eos_step(s, e, i, state, **gates, backend=backend)

            row = {"what": f"eos_step {form}", "backend": backend, "shape": [B, H, K, V],
                   **step_timings(one, args.step_iters, device, graph=backend == "triton")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # a whole layer: a one-layer GLA-style model (projections, gate, norm, a tiny head) at d = H·K,
    # stepped through the Decoder (the model's one forward, with a cache)
    d = H * K
    spec = {"vocab_size": 256, "d_model": d, "n_layers": 1, "n_heads": H, "channel_mixer": {"kind": "none"},
            "mixer": {"kind": "eos", "expand": {"source": "data"}, "shrink": {"source": "data", "scale": "rsqrt_k"},
                      "oscillation": {"kind": "vector_k", "source": "data", "parametrization": "sigmoid_tau", "tau": 16, "rank": 16},
                      "output": {"norm": "rmsnorm", "norm_scope": "head", "gate": "silu"}}}
    model = Model.from_spec(spec).to(device=device, dtype=dtype).eval()
    tok = torch.zeros(B, dtype=torch.long, device=device)
    for graph in ([False, True] if device.type == "cuda" else [False]):
        def layer_step(graph=graph):
            with torch.no_grad():
                decoder = Decoder(model, cuda_graph=graph)
                decoder.prefill(tok[:, None].expand(B, 4))
                ms = common.mean_ms(lambda: decoder.step(tok), args.step_iters, device, warmup=3)
                return {"graph_ms" if graph else "eager_ms": ms}

        row = {"what": f"one-layer model step (d={d}, GLA layer)", "backend": "auto", "shape": [B, H, K, V],
               **common.guard(layer_step, catch_all=True)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # softmax attention over a KV cache, one query per sequence
    for L in args.kv_contexts:
        row = common.guard(lambda L=L: sdpa_row(L, B, H, K, V, randn, args, device), catch_all=True)
        row.setdefault("what", f"SDPA decode, KV cache {L}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        common.free_cache(device)
    return rows


# --------------------------------------------------------------------------- report


def markdown(model_rows: list[dict], step_rows: list[dict]) -> str:
    cell = common.cell
    out = []
    if model_rows:
        table = []
        for r in model_rows:
            head = [r["model"], f"{r['params_M']:.1f}", r["batch"], f"{r['context']:,}"]
            if "ms_per_token" not in r:
                table.append(head + [r["error"], "—", "—", "—", "—", "—"])
                continue
            table.append(head + [f"{r['ms_per_token']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['cache_MiB']:.3g}",
                                 cell(r.get("decode_peak_GiB"), ".2f"), f"{r['prefill_s']:.2f}", "yes" if r["cuda_graph"] else "no"])
        out.append(common.markdown_table(["model", "params (M)", "batch", "context", "ms/token", "tokens/s", "cache (MiB)",
                                          "decode peak (GiB)", "prefill (s)", "CUDA graph"], table))
        out.append("")
        for key in dict.fromkeys((r["model"], r["batch"]) for r in model_rows):
            ms = [r["ms_per_token"] for r in model_rows if (r["model"], r["batch"]) == key and "ms_per_token" in r]
            if len(ms) > 1:
                out.append(f"{key[0]}, batch {key[1]}: ms/token from {min(ms):.3f} to {max(ms):.3f} across contexts "
                           f"(max/min − 1 = {100 * (max(ms) / min(ms) - 1):.1f}%)")
        out.append("")
    if step_rows:
        table = []
        for r in step_rows:
            if "error" in r and "eager_ms" not in r and "graph_ms" not in r:
                table.append([r["what"], "—", "—", r["error"], "—"])
                continue
            table.append([r["what"], r["backend"], ",".join(map(str, r["shape"])), cell(r.get("eager_ms"), ".4f"),
                          cell(r.get("graph_ms"), ".4f")])
        out.append(common.markdown_table(["step", "backend", "B,H,K,V", "eager ms", "CUDA-graph ms"], table))
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["gla", "transformer"], metavar="SPEC",
                   help="zoo names or spec files, resized to one shape (default: gla transformer)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="sequences decoded together (default: 1, then 8)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="prefill lengths")
    p.add_argument("--steps", type=int, default=128, help="timed one-token steps per context (default 128)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (the CUDA graph is captured here)")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch every kernel of each step (no graph)")
    p.add_argument("--step-shape", type=int, nargs=4, default=[8, 16, 128, 128], metavar=("B", "H", "K", "V"),
                   help="the one-layer step benchmark's shape (default 8 16 128 128)")
    p.add_argument("--kv-contexts", type=int, nargs="+", default=[1024, 16384, 65536], help="SDPA decode comparison")
    p.add_argument("--step-iters", type=int, default=400, help="calls timed per step benchmark row")
    p.add_argument("--only", choices=["models", "step"], help="run one part only")
    p.add_argument("--small", action="store_true", help="a tiny CPU-sized run of everything (a smoke test)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--json", help="write the results here")


def run(args) -> int:
    common.positive(args, "steps", "d_model", "layers", "heads", "vocab", "step_iters", "batch", "contexts",
                    "kv_contexts", "step_shape")
    common.non_negative(args, "warmup")
    if args.json:
        common.check_json_path(args.json)
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise BenchError(f"--device: unknown device '{args.device}'; allowed: auto, cpu, cuda")
    if args.device.startswith("cuda"):
        common.require_cuda(f"lcsm bench decode --device {args.device}", "use --device cpu (with --small) or auto")
        device = torch.device(args.device)
    elif args.device == "cpu":
        device = torch.device("cpu")
    elif args.small:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:  # auto at the full sizes: a CPU would take hours over 12 layers at 64K context
        device = common.require_cuda("lcsm bench decode at its default sizes",
                                     "use --small on the CPU (or --device cpu to run the full sizes there anyway)")
    if args.small:
        args.d_model, args.layers, args.heads, args.vocab = 64, 2, 2, 256
        args.contexts, args.kv_contexts, args.step_shape, args.batch = [64, 256], [64, 256], [2, 2, 16, 16], [1, 2]
        args.steps, args.warmup, args.step_iters = 8, 2, 20
    for name in args.models:  # every spec checked before anything is measured
        resized(name, args.d_model, args.layers, args.heads, args.vocab)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if args.small and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and noise on shared machines)
    try:
        return _run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, dtype) -> int:
    env = common.environment(device, dtype=str(dtype).replace("torch.", ""))
    print(json.dumps(env), flush=True)
    model_rows = bench_models(args, device, dtype) if args.only != "step" else []
    step_rows = bench_step(args, device) if args.only != "models" else []
    print()
    print(markdown(model_rows, step_rows))
    if args.json:
        common.write_json(args.json, {"env": env, "args": common.arguments(args), "models": model_rows, "step": step_rows})
    failed = [r for r in model_rows + step_rows if "error" in r]
    if failed:  # the other rows were kept and printed; the exit code still says something failed
        print(f"{len(failed)} row(s) failed (see 'error' above)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench decode", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
