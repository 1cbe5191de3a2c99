"""`lcsm bench kernels`: the Triton recurrence beside fla-core, FlashAttention (SDPA) and the torch
path, in one process, on one GPU; and a full-size bf16 correctness check against an fp64 oracle.

Timings are medians of triton.testing.do_bench. The memory floor of a call is the bytes it must
move (every input read once, every output written once) over the copy bandwidth measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lcsm.bench import common
from lcsm.bench.common import BenchError
from lcsm.kernels import eos_recurrence

DEFAULT_SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128)]
FORMS = ["ones", "scalar", "scalar_static", "vector_k", "vector_v", "outer", "full",
         "delta", "delta_scalar", "delta_vector_k"]  # the delta forms: see "the delta rule" below
FULL_K = 16  # `full` runs at K = 16 (Mamba's state size), V = D


def make_inputs(form: str, B: int, T: int, H: int, D: int, dtype, device, scale: float | None = None, seed: int = 0):
    """Canonical tensors for one form: s, e, i and the log gates (fp32).

    Gates default to logσ(z)/16 with z ~ N(0, 1) (GLA's parametrisation, about -0.05 per step);
    `scale` instead draws log gates uniformly in [-1.5, -0.5]·scale."""
    gen = torch.Generator(device=device).manual_seed(seed)
    K = FULL_K if form == "full" else D
    V = D

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    def log_gate(*shape):
        if scale is None:
            return F.logsigmoid(randn(*shape, dt=torch.float32)) / 16
        return -scale * (0.5 + torch.rand(*shape, generator=gen, device=device))

    s, e, i = randn(B, T, H, K) * K**-0.5, randn(B, T, H, K), randn(B, T, H, V)
    gates = {
        "ones": lambda: {},
        "scalar": lambda: {"g": log_gate(B, T, H)},
        "scalar_static": lambda: {"g": log_gate(H)},
        "vector_k": lambda: {"gk": log_gate(B, T, H, K)},
        "vector_v": lambda: {"gv": log_gate(B, T, H, V)},
        "outer": lambda: {"gk": log_gate(B, T, H, K) / 2, "gv": log_gate(B, T, H, V) / 2},
        "full": lambda: {"dt": F.softplus(randn(B, T, H, V, dt=torch.float32) - 4.0),
                         "A": -torch.exp(torch.log(torch.arange(1, K + 1, device=device, dtype=torch.float32))
                                         )[None, :, None].expand(H, K, V).contiguous()},
    }[form]()
    return s, e, i, gates


# fla-core treats g_gamma as a constant: it has no gradient, so its fwd+bwd differentiates s, e, i only
FLA_CONSTANT_GATES = {"scalar_static"}


def fla_counterpart(form: str):
    """fla-core's kernel for the same recurrence (scale 1, no normalisation), or None."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # fla-core not installed, or not importable here
        return None
    return {
        "ones": lambda s, e, i: chunk_linear_attn(s, e, i, scale=1.0, normalize=False)[0],
        "scalar": lambda s, e, i, g: chunk_simple_gla(s, e, i, g=g, scale=1.0)[0],
        "scalar_static": lambda s, e, i, g: chunk_simple_gla(s, e, i, g_gamma=g, scale=1.0)[0],
        "vector_k": lambda s, e, i, gk: chunk_gla(s, e, i, g=gk, scale=1.0)[0],
    }.get(form)


def floor_bytes(form: str, s, e, i, gates, backward: bool) -> int:
    """Bytes a forward (+ backward) must move at the least."""
    def nb(x):
        return x.numel() * x.element_size()

    gate_bytes = sum(nb(g) for g in gates.values())
    fwd = nb(s) + nb(e) + nb(i) + gate_bytes + nb(i)  # read s, e, i, gates; write y
    if not backward:
        return fwd
    # backward: read s, e, i, dy and the gates again, write ds, de, di and the gate gradients
    return fwd + nb(s) + nb(e) + 2 * nb(i) + gate_bytes + nb(s) + nb(e) + nb(i) + gate_bytes


def copy_bandwidth(device) -> float:
    """Bytes per ms of a large device-to-device copy, counting bytes read and written."""
    n = 1 << 29
    src = torch.randn(n, device=device, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = common.do_bench_ms(lambda: dst.copy_(src), warmup=25, rep=100)
    return 2 * n * 4 / ms  # (src and dst are freed on return; the caller empties the cache)


def timed(fn, warmup: int = 25, rep: int = 100):
    """The median ms of fn(), or what stopped it as a table cell ("OOM", "error: ...")."""
    try:
        return common.do_bench_ms(fn, warmup=warmup, rep=rep)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as err:  # a kernel that refuses a case: report it, go on
        torch.cuda.empty_cache()
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"


def fwd_bwd(op, tensors: list[torch.Tensor], n_diff: int | None = None):
    """A closure running op forward and backward; the first n_diff tensors (all by default) get gradients."""
    n_diff = len(tensors) if n_diff is None else n_diff
    leaves = [t.detach().clone().requires_grad_(k < n_diff) for k, t in enumerate(tensors)]
    dy = None

    def run():
        nonlocal dy
        y = op(*leaves)
        if dy is None:
            dy = torch.randn_like(y)
        return torch.autograd.grad(y, leaves[:n_diff], dy)

    return run


def with_backend(backend: str, names: list[str]):
    """eos_recurrence(s, e, i, *gates) -> y on one backend, the gates passed by their names."""
    def op(s, e, i, *g):
        return eos_recurrence(s, e, i, backend=backend, **dict(zip(names, g)))[0]

    return op


def time_form(form: str, shape, device, bandwidth: float, dtype=torch.bfloat16, torch_path: bool = True) -> dict:
    """One row: ours (Triton), fla-core's and the torch path's times of one form at shape B,T,H,D,
    and the memory floors. The inputs are freed when it returns."""
    if form in DELTA_FORMS:
        return time_delta_form(form, shape, device, bandwidth, dtype, torch_path)
    B, T, H, D = shape
    s, e, i, gates = make_inputs(form, B, T, H, D, dtype, device)
    tensors = [s, e, i, *gates.values()]
    ours, torch_op = with_backend("triton", list(gates)), with_backend("torch", list(gates))
    row = {"form": form, "shape": shape}
    row["ours_fwd"] = timed(lambda: ours(*tensors))
    row["ours_fwdbwd"] = timed(fwd_bwd(ours, tensors))
    fla = fla_counterpart(form)
    if fla is not None:
        row["fla_fwd"] = timed(lambda: fla(*tensors))
        row["fla_fwdbwd"] = timed(fwd_bwd(fla, tensors, 3 if form in FLA_CONSTANT_GATES else None))
    if torch_path and form != "full":
        row["torch_fwd"] = timed(lambda: torch_op(*tensors), warmup=2, rep=10)
    row["floor_fwd"] = floor_bytes(form, s, e, i, gates, False) / bandwidth
    row["floor_fwdbwd"] = floor_bytes(form, s, e, i, gates, True) / bandwidth
    return row


def time_sdpa(shape, device, dtype=torch.bfloat16) -> dict:
    """FlashAttention through SDPA, the softmax baseline at the same shape (q, k, v [B,H,T,D])."""
    B, T, H, D = shape
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"form": "softmax (SDPA)", "shape": shape, "ours_fwd": timed(lambda: sdpa(q, k, v)),
            "ours_fwdbwd": timed(fwd_bwd(sdpa, [q, k, v]))}


def bench_shape(shape, forms, device, bandwidth, dtype=torch.bfloat16, torch_path=True, out=None, save=None):
    """Times every form at one shape; rows are appended to `out` as they come (`save` after each)."""
    rows = [] if out is None else out
    for form in forms:
        row = time_form(form, shape, device, bandwidth, dtype, torch_path)
        torch.cuda.empty_cache()
        rows.append(row)
        if save:
            save()
        print(_fmt_row(row), flush=True)
    row = time_sdpa(shape, device, dtype)
    torch.cuda.empty_cache()
    rows.append(row)
    if save:
        save()
    print(_fmt_row(row), flush=True)
    return rows


def _ms(x):
    return f"{x:.3f}" if isinstance(x, float) else ("—" if x is None else str(x))


def _ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "—"


def _fmt_row(r):
    return (f"{r['form']:<15} fwd ours {_ms(r.get('ours_fwd'))} fla {_ms(r.get('fla_fwd'))} "
            f"(×{_ratio(r.get('ours_fwd'), r.get('fla_fwd'))}, floor ×{_ratio(r.get('ours_fwd'), r.get('floor_fwd'))}) | "
            f"fwd+bwd ours {_ms(r.get('ours_fwdbwd'))} fla {_ms(r.get('fla_fwdbwd'))} "
            f"(×{_ratio(r.get('ours_fwdbwd'), r.get('fla_fwdbwd'))}, floor ×{_ratio(r.get('ours_fwdbwd'), r.get('floor_fwdbwd'))}) | "
            f"torch fwd {_ms(r.get('torch_fwd'))}")


def markdown_table(rows) -> str:
    columns = ["form", "B,T,H,D", "fwd ours", "fwd fla", "ours/fla", "ours/floor", "fwd+bwd ours", "fwd+bwd fla", "ours/fla",
               "ours/floor", "torch fwd"]
    return common.markdown_table(columns, [[
        r["form"], ",".join(map(str, r["shape"])), _ms(r.get("ours_fwd")), _ms(r.get("fla_fwd")),
        _ratio(r.get("ours_fwd"), r.get("fla_fwd")), _ratio(r.get("ours_fwd"), r.get("floor_fwd")),
        _ms(r.get("ours_fwdbwd")), _ms(r.get("fla_fwdbwd")), _ratio(r.get("ours_fwdbwd"), r.get("fla_fwdbwd")),
        _ratio(r.get("ours_fwdbwd"), r.get("floor_fwdbwd")), _ms(r.get("torch_fwd")),
    ] for r in rows])


def profile_form(form, shape, device, dtype=torch.bfloat16, steps: int = 5) -> str:
    """Per-kernel GPU time of one forward (inputs without gradients, as the timings take it) and of
    one forward+backward, ours and fla-core's, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    B, T, H, D = shape
    if form in DELTA_FORMS:
        tensors, ours, fla = delta_case(form, B, T, H, D, dtype, device)
        ours = ours("triton")
        n_diff = None
    else:
        s, e, i, gates = make_inputs(form, B, T, H, D, dtype, device)
        tensors = [s, e, i, *gates.values()]
        ours, fla = with_backend("triton", list(gates)), fla_counterpart(form)
        n_diff = 3 if form in FLA_CONSTANT_GATES else None
    runs = {"ours forward": lambda: ours(*tensors)}
    if fla is not None:
        runs["fla forward"] = lambda: fla(*tensors)
    runs["ours fwd+bwd"] = fwd_bwd(ours, tensors)
    if fla is not None:
        runs["fla fwd+bwd"] = fwd_bwd(fla, tensors, n_diff)
    out = []
    for who, fn in runs.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
        except Exception as err:
            out.append(f"{form} {who}: error {type(err).__name__}")
            continue
        rows = [(ev.key, ev.device_time_total / steps / 1e3) for ev in prof.key_averages()]
        rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
        total = sum(ms for _, ms in rows)
        out.append(f"{form} {who}: {total:.3f} ms on the GPU")
        out += [f"  {ms:8.3f} ms  {name[:90]}" for name, ms in rows[:14]]
    out.append(tuned_configs())
    return "\n".join(out)


def tuned_configs() -> str:
    """The configuration each of our autotuned kernels settled on, per key, and the time of every
    configuration its last tuning in this process measured (an A/B of the tile and code-path choices
    from one run: the tuner's own do_bench, same inputs)."""
    from lcsm.kernels.triton import chunk as triton_chunk
    from lcsm.kernels.triton import delta as triton_delta
    from lcsm.kernels.triton import scan as triton_scan

    lines = []
    for mod in (triton_chunk, triton_scan, triton_delta):
        for name, obj in vars(mod).items():
            cache = getattr(obj, "cache", None)
            if isinstance(cache, dict) and cache:
                for key, cfg in cache.items():
                    lines.append(f"  tuned {name} {key}: {cfg}")
                timings = getattr(obj, "configs_timings", None) or {}
                # a tuning read back from Triton's cache gives no timings
                for cfg, ms in sorted(timings.items(), key=lambda kv: _first(kv[1])) if isinstance(timings, dict) else ():
                    lines.append(f"    {_first(ms):8.4f} ms  {cfg}")
    return "\n".join(lines)


def _first(ms) -> float:
    # do_bench answers a float, or a list (median and quantiles) in some Triton releases
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


# --------------------------------------------------------------------------- correctness


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_form(form, shape, device, scale=None, with_fla=True, with_ours=True, dtype=torch.bfloat16, beta="sigmoid"):
    """Relative errors of bf16 outputs and gradients against an fp64 oracle (the torch path in fp64,
    itself checked against the reference loop by the test suite), ours and fla-core's side by side.
    `beta` (delta forms only): how β is drawn, one of BETAS."""
    if form in DELTA_FORMS:
        return check_delta_form(form, shape, device, scale, with_fla, with_ours, dtype, beta)
    B, T, H, D = shape
    s, e, i, gates = make_inputs(form, B, T, H, D, dtype, device, scale=scale, seed=1)
    names = list(gates)
    tensors = [s, e, i, *gates.values()]
    gen = torch.Generator(device=device).manual_seed(2)
    dy = torch.randn(B, T, H, D, generator=gen, device=device, dtype=torch.float32)

    def grads_of(op, dtype, tensors=tensors, dy=dy):
        leaves = [t.detach().to(dtype if k < 3 else torch.float64 if dtype == torch.float64 else t.dtype)
                  .clone().requires_grad_(True) for k, t in enumerate(tensors)]
        y = op(*leaves)
        g = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        return [y.detach()] + [x.detach() for x in g]

    def oracle_of(op):
        # one sequence at a time: the fp64 chunked path holds [T/C, C, C, D] decay tensors
        batched = [True] * 3 + [n != "A" and t.dim() >= 3 for n, t in gates.items()]  # A is [H,K,V]
        per_b = []
        for b in range(B):
            part = [t[b:b + 1] if bt else t for bt, t in zip(batched, tensors)]
            per_b.append(grads_of(op, torch.float64, part, dy[b:b + 1]))
        return [torch.cat(xs) if bt else sum(xs) for bt, xs in zip([True] + batched, zip(*per_b))]

    oracle = oracle_of(with_backend("torch", names))
    labels = ["y", "ds", "de", "di"] + [f"d{n}" for n in names]
    out = {"form": form, "shape": shape, "scale": scale}
    if with_ours:
        ours = grads_of(with_backend("triton", names), dtype)
        out["ours"] = dict(zip(labels, (_rel(a, b) for a, b in zip(ours, oracle))))
        del ours
    fla = fla_counterpart(form) if with_fla else None
    if fla is not None:
        try:
            theirs = grads_of(fla, dtype)
            out["fla"] = dict(zip(labels, (_rel(a, b) for a, b in zip(theirs, oracle))))
        except Exception as err:
            out["fla"] = f"error: {type(err).__name__}"
    del oracle
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- the delta rule

DELTA_FORMS = ("delta", "delta_scalar", "delta_vector_k")
DELTA_GATE = {"delta": None, "delta_scalar": "g", "delta_vector_k": "gk"}


BETAS = ("sigmoid", "near_one")  # β = σ(z), z ~ N(0, 1); or β uniform in [0.9, 1], the hard case


def delta_case(form: str, B: int, T: int, H: int, D: int, dtype, device, scale: float | None = None, seed: int = 0,
               beta: str = "sigmoid"):
    """The delta rule in fla's terms: leaves [q, k, v, beta, (g | gk)] and two ops on them, ours and
    fla-core's (or None), each `op(*leaves) -> y`.

    fla: S_t = D_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ (q_t·scale) with unit keys k —
    chunk_delta_rule (D = 1), chunk_gated_delta_rule (g [B,T,H]), chunk_kda (g along K [B,T,H,K]).
    Ours is the same recurrence mapped exactly: s = q (already scaled, so fla gets scale=1), w = k,
    e = β k, i = v and the same log decay; `ours(backend)` forms e = β k inside the op, so both
    sides differentiate the same leaves (q, k, v, β and the gate) and their gradients compare 1:1.
    q·K^-1/2, k L2-normalised, β = σ(z) (or uniform in [0.9, 1] with beta="near_one": a removal that
    nearly erases the key's slot, where a chunk's triangular system is closest to singular); log
    gates as make_inputs (or uniform in [-1.5,-0.5]·scale)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    def log_gate(*shape):
        if scale is None:
            return F.logsigmoid(randn(*shape)) / 16
        return -scale * (0.5 + torch.rand(*shape, generator=gen, device=device))

    q = (randn(B, T, H, D) * D**-0.5).to(dtype)
    k = F.normalize(randn(B, T, H, D), dim=-1).to(dtype)
    v = randn(B, T, H, D).to(dtype)
    if beta == "near_one":
        beta = (1 - 0.1 * torch.rand(B, T, H, generator=gen, device=device)).to(dtype)
    else:
        beta = torch.sigmoid(randn(B, T, H)).to(dtype)
    name = DELTA_GATE[form]
    leaves = [q, k, v, beta] + ([] if name is None else [log_gate(B, T, H) if name == "g" else log_gate(B, T, H, D)])

    def ours(backend):
        def op(q, k, v, beta, *gate):
            decay = {} if name is None else {name: gate[0]}
            return eos_recurrence(q, k, v, w=k, beta=beta, backend=backend, **decay)[0]  # fla's form: β not folded into k

        return op

    fla = None
    try:
        if form == "delta":
            from fla.ops.delta_rule import chunk_delta_rule

            def fla(q, k, v, beta):
                return chunk_delta_rule(q, k, v, beta, scale=1.0)[0]
        elif form == "delta_scalar":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            def fla(q, k, v, beta, g):
                return chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, use_qk_l2norm_in_kernel=False)[0]
        else:
            from fla.ops.kda import chunk_kda

            def fla(q, k, v, beta, g):
                return chunk_kda(q, k, v, g, beta, scale=1.0)[0]
    except Exception:  # fla-core not installed, too old for the form, or not importable here
        fla = None
    return leaves, ours, fla


def time_delta_form(form, shape, device, bandwidth: float, dtype=torch.bfloat16, torch_path: bool = True) -> dict:
    """time_form for a delta form: ours (Triton) beside fla-core's kernel on the same leaves."""
    B, T, H, D = shape
    leaves, ours, fla = delta_case(form, B, T, H, D, dtype, device)
    row = {"form": form, "shape": shape}
    row["ours_fwd"] = timed(lambda: ours("triton")(*leaves))
    row["ours_fwdbwd"] = timed(fwd_bwd(ours("triton"), leaves))
    if fla is not None:
        row["fla_fwd"] = timed(lambda: fla(*leaves))
        row["fla_fwdbwd"] = timed(fwd_bwd(fla, leaves))
    if torch_path:
        row["torch_fwd"] = timed(lambda: ours("torch")(*leaves), warmup=2, rep=10)
    read = sum(x.numel() * x.element_size() for x in leaves)
    out = leaves[2].numel() * leaves[2].element_size()
    row["floor_fwd"] = (read + out) / bandwidth
    row["floor_fwdbwd"] = (2 * read + 2 * out + read) / bandwidth  # fwd; read again with dy; write the gradients
    return row


def leaf_grads(op, leaves, dy, dt) -> list[torch.Tensor]:
    """[y, then the gradient of every leaf] of op(*leaves) against dy, the leaves cast to dt (fp32
    gates stay fp32 unless dt is fp64): what check_delta_form compares with the fp64 oracle."""
    x = [t.detach().to(dt if dt == torch.float64 or t.dtype != torch.float32 else t.dtype).clone().requires_grad_()
         for t in leaves]
    y = op(*x)
    return [y.detach()] + [g.detach() for g in torch.autograd.grad(y, x, dy.to(y.dtype))]


def check_delta_form(form, shape, device, scale=None, with_fla=True, with_ours=True, dtype=torch.bfloat16,
                     beta: str = "sigmoid"):
    """check_form for a delta form: relative errors of the bf16 output and the gradients of q, k, v, β
    and the gate against the fp64 torch path, one sequence at a time (ours and fla-core's)."""
    B, T, H, D = shape
    leaves, ours, fla = delta_case(form, B, T, H, D, dtype, device, scale=scale, seed=1, beta=beta)
    dy = torch.randn(B, T, H, D, generator=torch.Generator(device=device).manual_seed(2), device=device)

    per_b = [leaf_grads(ours("torch"), [t[b:b + 1] for t in leaves], dy[b:b + 1], torch.float64) for b in range(B)]
    oracle = [torch.cat(xs) for xs in zip(*per_b)]
    labels = ["y", "dq", "dk", "dv", "dbeta"] + ([] if DELTA_GATE[form] is None else [f"d{DELTA_GATE[form]}"])
    res = {"form": form, "shape": shape, "scale": scale, "beta": beta}
    if with_ours:
        got = leaf_grads(ours("triton"), leaves, dy, dtype)
        res["ours"] = dict(zip(labels, (_rel(a, b) for a, b in zip(got, oracle))))
        finite = all(bool(torch.isfinite(a).all()) for a in got)
        res["ours"]["finite"] = float(finite)
        del got
    if with_fla and fla is not None:
        try:
            got = leaf_grads(fla, leaves, dy, dtype)
            res["fla"] = dict(zip(labels, (_rel(a, b) for a, b in zip(got, oracle))))
        except Exception as err:
            res["fla"] = f"error: {type(err).__name__}"
    del oracle
    torch.cuda.empty_cache()
    return res


def check_finite(form: str, T: int, H: int, D: int, device, scale: float, dtype=torch.bfloat16) -> dict:
    """One sequence of T tokens through our Triton kernel, forward and backward, in bf16: is every
    output and gradient finite, and the largest |y|. Delta forms with β in [0.9, 1]; log gates
    uniform in [-1.5, -0.5]·scale. No oracle: at this length it would not fit; the relative
    errors come from check_form at the first shape."""
    if form in DELTA_FORMS:
        leaves, ours, _ = delta_case(form, 1, T, H, D, dtype, device, scale=scale, seed=3, beta="near_one")
        op = ours("triton")
    else:
        s, e, i, gates = make_inputs(form, 1, T, H, D, dtype, device, scale=scale, seed=3)
        leaves, op = [s, e, i, *gates.values()], with_backend("triton", list(gates))
    x = [t.detach().clone().requires_grad_() for t in leaves]
    y = op(*x)
    grads = torch.autograd.grad(y, x, torch.randn_like(y))
    finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    out = {"form": form, "T": T, "H": H, "D": D, "scale": scale, "finite": finite, "max_abs_y": float(y.detach().abs().max())}
    del x, y, grads
    torch.cuda.empty_cache()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="*", default=None, metavar="B,T,H,D",
                   help="shapes to time (default: 8,4096,16,128 2,16384,16,128); the check uses the first")
    p.add_argument("--forms", nargs="*", default=FORMS, choices=FORMS, metavar="FORM",
                   help=f"forms to run (default: all of {', '.join(FORMS)})")
    p.add_argument("--check", action="store_true", help="also check bf16 outputs and gradients against fp64")
    p.add_argument("--check-only", action="store_true", help="only the correctness check, no timings")
    p.add_argument("--no-torch", action="store_true", help="skip timing the torch path")
    p.add_argument("--finite-tokens", type=int, default=0, metavar="T",
                   help="with the check: also one sequence of T tokens per form (H, D of the first shape), forward "
                        "and backward at log-gate scales 1e-3 and 5 (delta forms: β in [0.9, 1]), every value finite?")
    p.add_argument("--impl", choices=["both", "ours", "fla"], default="both",
                   help="check only ours or only fla-core's (e.g. to compile both in parallel processes)")
    p.add_argument("--profile", action="store_true", help="only print per-kernel GPU times of the forward and of fwd+bwd (first shape)")
    p.add_argument("--json", help="write the results here (rewritten after every row)")


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise BenchError(f"--shapes: expected B,T,H,D with four positive integers, got {text!r}")
    return shape


def run(args) -> int:
    shapes = [_parse_shape(s) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    if args.json:
        common.check_json_path(args.json)
    device = common.require_cuda("lcsm bench kernels")
    env = common.environment(device)
    print(json.dumps(env), flush=True)
    results = {"env": env, "checks": [], "timings": []}

    def save():
        if args.json:
            common.write_json(args.json, results)

    if args.profile:
        for form in args.forms:
            print(profile_form(form, shapes[0], device), flush=True)
        return 0
    if args.finite_tokens < 0:
        raise BenchError(f"--finite-tokens must be at least 0 (got {args.finite_tokens})")
    if args.check or args.check_only:
        shape = shapes[0]
        for form in args.forms:
            scales = [1e-3, 0.1, 5.0] if form in ("vector_k", *DELTA_FORMS) else [None]
            betas = BETAS if form in DELTA_FORMS else (None,)
            for scale, beta in ((sc, b) for b in betas for sc in scales):
                t0 = time.time()
                extra = {} if beta is None else {"beta": beta}
                try:
                    res = check_form(form, shape, device, scale=scale, with_fla=args.impl != "ours",
                                     with_ours=args.impl != "fla", **extra)
                except Exception as err:  # report and go on with the other forms
                    import traceback

                    traceback.print_exc()
                    results["checks"].append({"form": form, "scale": scale, "error": repr(err)})
                    torch.cuda.empty_cache()
                    continue
                results["checks"].append(res)
                save()
                print(f"check {form} scale={scale}" + (f" beta={beta}" if beta else "") + ": ours " + " ".join(f"{k} {v:.1e}" for k, v in res.get("ours", {}).items())
                      + (f" | fla {res['fla']}" if "fla" in res else "") + f" ({time.time() - t0:.0f}s)", flush=True)
        for form in args.forms if args.finite_tokens else []:
            for scale in (1e-3, 5.0):
                res = common.guard(lambda: check_finite(form, args.finite_tokens, shape[2], shape[3], device, scale),
                                   catch_all=True)
                res.update(form=form, T=args.finite_tokens, scale=scale)
                results["checks"].append(res)
                save()
                print(f"finite {form} T={args.finite_tokens} scale={scale}: "
                      + (res["error"] if "error" in res else f"finite {res['finite']}, max |y| {res['max_abs_y']:.3g}"),
                      flush=True)
        if args.check_only:
            return 0
    bandwidth = copy_bandwidth(device)
    torch.cuda.empty_cache()
    env["copy_GBps"] = bandwidth / 1e6
    print(f"copy bandwidth {bandwidth / 1e6:.0f} GB/s", flush=True)
    for shape in shapes:
        bench_shape(shape, args.forms, device, bandwidth, torch_path=not args.no_torch, out=results["timings"], save=save)
    print(markdown_table(results["timings"]))
    return 0


def main(argv=None) -> int:
    return common.main("lcsm bench kernels", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
