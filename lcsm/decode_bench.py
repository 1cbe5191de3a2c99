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

`--small` runs a tiny version on the CPU (a smoke test of the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from lcsm.cache import cache_bytes
from lcsm.generate import Decoder, supports_cuda_graph
from lcsm.kernels import eos_step
from lcsm.model import Model
from lcsm.throughput import resized


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, iters: int, device, warmup: int = 3) -> float:
    """Mean milliseconds of fn() over `iters` calls, synchronised at both ends."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def graphed_ms(fn, iters: int, per_graph: int = 16) -> float:
    """Milliseconds per fn() when `per_graph` calls are captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    reps = max(1, iters // per_graph)
    return timed_ms(graph.replay, reps, torch.device("cuda")) / per_graph


# --------------------------------------------------------------------------- models


def decode_row(model, name: str, context: int, batch: int, steps: int, warmup: int, cuda_graph: bool, device) -> dict:
    """Prefill `context` random tokens, then time `steps` greedy steps."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model.spec.vocab_size, (batch, context), generator=gen).to(device)
    graph = cuda_graph and device.type == "cuda" and supports_cuda_graph(model)
    decoder = Decoder(model, cuda_graph=graph, max_len=context + warmup + steps + 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    logits = decoder.prefill(tokens)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    row = {"model": name, "context": context, "batch": batch, "cuda_graph": graph, "prefill_s": prefill_s}
    if device.type == "cuda":
        row["prefill_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    nxt = logits.argmax(-1)
    for _ in range(warmup):
        nxt = decoder.step(nxt).argmax(-1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = decoder.step(nxt).argmax(-1)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    row.update(ms_per_token=dt * 1e3, tokens_per_s=batch / dt, cache_MiB=cache_bytes(decoder.cache) / 2**20)
    if device.type == "cuda":
        row["decode_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del decoder
    return row


def _guard(measure) -> dict:
    """measure() -> dict, or {"error": ...} with the traceback on stderr (the other rows go on)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # one failing row must not cost the rest of a GPU session
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def bench_models(args, device, dtype) -> list[dict]:
    rows = []
    for name in args.models:
        spec = resized(name, args.d_model, args.layers, args.heads, args.vocab)
        label = spec.name or name
        torch.manual_seed(0)
        model = Model(spec).to(device=device, dtype=dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        for batch in args.batch:
            # untimed: compiles (and autotunes) the kernels, so no row's prefill time includes that
            _guard(lambda: decode_row(model, label, min(args.contexts), batch, 2, 1, not args.no_cuda_graph, device))
            for context in args.contexts:
                def attempt(graph, batch=batch, context=context):
                    with torch.no_grad():
                        return decode_row(model, label, context, batch, args.steps, args.warmup, graph, device)

                where = {"model": label, "context": context, "batch": batch}
                row = {**where, **_guard(lambda: attempt(not args.no_cuda_graph))}
                if "error" in row and not args.no_cuda_graph and device.type == "cuda" and supports_cuda_graph(model):
                    # say so, and measure it without the graph
                    row = {**where, **_guard(lambda: attempt(False)), "graph_error": row["error"]}
                row["params_M"] = params / 1e6
                rows.append(row)
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
    return rows


# --------------------------------------------------------------------------- one layer's step


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
            def one(backend=backend):
                eos_step(s, e, i, state, **gates, backend=backend)

            row = {"what": f"eos_step {form}", "backend": backend, "shape": [B, H, K, V]}
            row.update(_guard(lambda: {"eager_ms": timed_ms(one, args.step_iters, device)}))
            if device.type == "cuda" and backend == "triton":
                row.update(_guard(lambda: {"graph_ms": graphed_ms(one, args.step_iters)}))
            rows.append(row)
            print(json.dumps(row), flush=True)
    # a whole layer: a one-layer GLA-style model (projections, gate, norm, a tiny head) at d = H·K
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
                return {"graph_ms" if graph else "eager_ms": timed_ms(lambda: decoder.step(tok), args.step_iters, device)}

        row = {"what": f"one-layer model step (d={d}, GLA layer)", "backend": "auto", "shape": [B, H, K, V], **_guard(layer_step)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # softmax attention over a KV cache, one query per sequence
    for L in args.kv_contexts:
        try:
            q = randn(B, H, 1, K)
            kc, vc = randn(B, H, L, K), randn(B, H, L, V)

            def attend():
                F.scaled_dot_product_attention(q, kc, vc)

            row = {"what": f"SDPA decode, KV cache {L}", "backend": "sdpa", "shape": [B, H, K, V],
                   "eager_ms": timed_ms(attend, args.step_iters, device)}
            if device.type == "cuda":
                row["graph_ms"] = graphed_ms(attend, args.step_iters)
            del kc, vc
        except Exception as e:
            row = {"what": f"SDPA decode, KV cache {L}", "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- report


def _num(x, fmt):
    return "—" if x is None else format(x, fmt)


def markdown(model_rows: list[dict], step_rows: list[dict]) -> str:
    out = []
    if model_rows:
        out += ["| model | params (M) | batch | context | ms/token | tokens/s | cache (MiB) | decode peak (GiB) | prefill (s) | CUDA graph |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in model_rows:
            head = f"| {r['model']} | {r['params_M']:.1f} | {r['batch']} | {r['context']:,} |"
            if "ms_per_token" not in r:
                out.append(f"{head} {r['error']} | — | — | — | — | — |")
                continue
            out.append(f"{head} {r['ms_per_token']:.3f} | {r['tokens_per_s']:,.0f} | {r['cache_MiB']:.3g} | "
                       f"{_num(r.get('decode_peak_GiB'), '.2f')} | {r['prefill_s']:.2f} | {'yes' if r['cuda_graph'] else 'no'} |")
        out.append("")
        for key in dict.fromkeys((r["model"], r["batch"]) for r in model_rows):
            ms = [r["ms_per_token"] for r in model_rows if (r["model"], r["batch"]) == key and "ms_per_token" in r]
            if len(ms) > 1:
                out.append(f"{key[0]}, batch {key[1]}: ms/token from {min(ms):.3f} to {max(ms):.3f} across contexts "
                           f"(max/min − 1 = {100 * (max(ms) / min(ms) - 1):.1f}%)")
        out.append("")
    if step_rows:
        out += ["| step | backend | B,H,K,V | eager ms | CUDA-graph ms |", "|---|---|---|---|---|"]
        for r in step_rows:
            if "error" in r and "eager_ms" not in r and "graph_ms" not in r:
                out.append(f"| {r['what']} | — | — | {r['error']} | — |")
                continue
            out.append(f"| {r['what']} | {r['backend']} | {','.join(map(str, r['shape']))} | "
                       f"{_num(r.get('eager_ms'), '.4f')} | {_num(r.get('graph_ms'), '.4f')} |")
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
    from lcsm.cli import UsageError

    for name in ("steps", "d_model", "layers", "heads", "vocab", "step_iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0 (got {args.warmup})")
    for name in ("batch", "contexts", "kv_contexts", "step_shape"):
        if min(getattr(args, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: every value must be at least 1 (got {getattr(args, name)})")
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise UsageError(f"--device: '{args.device}' is not available here; allowed: auto, cpu, cuda (with a GPU)")
    if args.small:
        args.d_model, args.layers, args.heads, args.vocab = 64, 2, 2, 256
        args.contexts, args.kv_contexts, args.step_shape, args.batch = [64, 256], [64, 256], [2, 2, 16, 16], [1, 2]
        args.steps, args.warmup, args.step_iters = 8, 2, 20
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if args.small and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and noise on shared machines)
    try:
        return _run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, dtype) -> int:
    env = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", "")}
    print(json.dumps(env), flush=True)
    model_rows = bench_models(args, device, dtype) if args.only != "step" else []
    step_rows = bench_step(args, device) if args.only != "models" else []
    print()
    print(markdown(model_rows, step_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(args).items() if not callable(v)}, "models": model_rows, "step": step_rows}, f, indent=1)
    failed = [r for r in model_rows + step_rows if "error" in r]
    if failed:  # the other rows were kept and printed; the exit code still says something failed
        print(f"{len(failed)} row(s) failed (see 'error' above)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcsm bench decode", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
