"""What the kernel tests and benchmarks share: the catalogue of decay forms and the error measure.

`gates(form, B, T, H, K, V, scale=...)` draws the canonical log-decay tensors of one form with log
gates uniform in [-1.5, -0.5]·scale per step (so scale 1e-3 is weak, 0.1 moderate, 5 strong);
the delta forms add w, L2-normalised random keys, and `delta_expand(w, beta=...)` draws the
matching expand e = β w (DeltaNet's (I − β k̂ k̂ᵀ), ‖w‖·‖e‖ = β); `rel_error(a, b)` is
‖a − b‖ / ‖b‖ in fp64.
"""

from __future__ import annotations

import torch

# form -> the decay tensors it uses: per token, static ([H], [H,K], [H,V], [H,K,V]) or mixed
FORMS = (
    "ones", "scalar", "scalar_static", "vector_k", "vector_k_static", "vector_v", "vector_v_static",
    "outer", "scalar_and_vector_k", "scalar_and_vector_v", "full_dt_A", "full_static", "full",
    "delta", "delta_scalar", "delta_scalar_static", "delta_vector_k", "delta_vector_k_static", "delta_scalar_and_vector_k",
)
DELTA = tuple(f for f in FORMS if f.startswith("delta"))  # w [B,T,H,K] with an element-wise decay: (I − w eᵀ) D
SEPARABLE = tuple(f for f in FORMS if not f.startswith(("full", "delta")))


def gates(form: str, B: int, T: int, H: int, K: int, V: int, *, scale: float = 0.1, dtype=torch.float32,
          device="cpu", gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The log decays of `form` (see FORMS); forms with two decays split `scale` between them. A
    delta form ("delta_<element-wise form>", "delta" alone: no decay) adds w, unit keys."""
    if form not in FORMS:
        raise ValueError(f"unknown decay form '{form}'; known: {', '.join(FORMS)}")
    if form in DELTA:
        inner = form[len("delta_"):] or "ones"
        out = gates(inner, B, T, H, K, V, scale=scale, dtype=dtype, device=device, gen=gen)
        return {**out, "w": unit_keys(B, T, H, K, dtype=dtype, device=device, gen=gen)}

    def neg(*shape, sc=scale):
        return (-sc * (0.5 + torch.rand(*shape, generator=gen, dtype=dtype))).to(device)

    def pos(*shape, sc=scale):
        return (sc * (0.5 + torch.rand(*shape, generator=gen, dtype=dtype))).to(device)

    half = scale / 2
    make = {
        "ones": lambda: {},
        "scalar": lambda: {"g": neg(B, T, H)},
        "scalar_static": lambda: {"g": neg(H)},
        "vector_k": lambda: {"gk": neg(B, T, H, K)},
        "vector_k_static": lambda: {"gk": neg(H, K)},
        "vector_v": lambda: {"gv": neg(B, T, H, V)},
        "vector_v_static": lambda: {"gv": neg(H, V)},
        "outer": lambda: {"gk": neg(B, T, H, K, sc=half), "gv": neg(B, T, H, V, sc=half)},
        "scalar_and_vector_k": lambda: {"g": neg(H, sc=half), "gk": neg(B, T, H, K, sc=half)},
        "scalar_and_vector_v": lambda: {"g": neg(B, T, H, sc=half), "gv": neg(H, V, sc=half)},
        "full_dt_A": lambda: {"dt": pos(B, T, H, V), "A": -(0.5 + torch.rand(H, K, V, generator=gen, dtype=dtype)).to(device)},
        "full_static": lambda: {"A": neg(H, K, V)},
        "full": lambda: {"A": neg(B, T, H, K, V)},
    }
    return make[form]()


def unit_keys(B: int, T: int, H: int, K: int, *, dtype=torch.float32, device="cpu",
              gen: torch.Generator | None = None) -> torch.Tensor:
    """Random L2-normalised keys [B,T,H,K] (the delta rule's removal keys k̂)."""
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    return (k / k.norm(dim=-1, keepdim=True)).to(device)


def delta_expand(w: torch.Tensor, *, beta: tuple[float, float] = (0.0, 1.0), tilt: float = 0.0,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """The expand e for the removal keys w (unit vectors [B,T,H,K]) of a delta form: e = β ŵ' with
    β uniform in [beta[0], beta[1]] per token and head and ŵ' = normalise(w + tilt·n), n Gaussian.
    tilt = 0 is DeltaNet's e = β k̂ (transition I − β k̂ k̂ᵀ, eigenvalues 1 and 1 − β); tilt > 0
    gives an e that is not parallel to w (the general transition), still with ‖w‖·‖e‖ = β."""
    B, T, H = w.shape[:3]
    b = beta[0] + (beta[1] - beta[0]) * torch.rand(B, T, H, 1, generator=gen, dtype=w.dtype, device="cpu")
    d = w.detach().cpu()
    if tilt:
        d = d + tilt * torch.randn(d.shape, generator=gen, dtype=d.dtype)
        d = d / d.norm(dim=-1, keepdim=True)
    return (b * d).to(w.device)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in fp64 on the CPU (a NaN anywhere gives NaN, which fails any bound)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
