"""What the kernel tests and benchmarks share: the catalogue of decay forms and the error measure.

`gates(form, B, T, H, K, V, scale=...)` draws the canonical log-decay tensors of one form with log
gates uniform in [-1.5, -0.5]·scale per step (so scale 1e-3 is weak, 0.1 moderate, 5 strong);
`rel_error(a, b)` is ‖a − b‖ / ‖b‖ in fp64.
"""

from __future__ import annotations

import torch

# form -> the decay tensors it uses: per token, static ([H], [H,K], [H,V], [H,K,V]) or mixed
FORMS = (
    "ones", "scalar", "scalar_static", "vector_k", "vector_k_static", "vector_v", "vector_v_static",
    "outer", "scalar_and_vector_k", "scalar_and_vector_v", "full_dt_A", "full_static", "full",
)
SEPARABLE = tuple(f for f in FORMS if not f.startswith("full"))


def gates(form: str, B: int, T: int, H: int, K: int, V: int, *, scale: float = 0.1, dtype=torch.float32,
          device="cpu", gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The log decays of `form` (see FORMS); forms with two decays split `scale` between them."""
    if form not in FORMS:
        raise ValueError(f"unknown decay form '{form}'; known: {', '.join(FORMS)}")

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


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in fp64 on the CPU (a NaN anywhere gives NaN, which fails any bound)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
