"""A log decay of -inf is a hard reset (o = 0): every backend gives the reference loop's outputs,
final states and gradients, finite everywhere (the chunked forms floor it at LOG_ZERO, whose exp
is exactly 0)."""

import os

import pytest
import torch

from lcsm.kernels import LOG_ZERO, eos_recurrence, eos_step
from lcsm.kernels.testing import rel_error

B, T, H, K, V = 2, 70, 2, 8, 8
# the Triton interpreter's time goes with batch × heads × length (and the scan kernels', for the
# full decay, with the K and V tiles too): one sequence there, and a smaller state for the scan
TRITON_B, SCAN_KV = 1, (3, 5)
RESETS = (0, 5, 63, 64, 69)  # the first token, inside a chunk, both sides of a chunk boundary, the last
BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else [])


def test_exp_of_log_zero_is_exactly_zero():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.exp(torch.tensor(LOG_ZERO, dtype=dtype)) == 0


def gates(form: str, gen, B=B, K=K, V=V) -> dict:
    shape = {"g": (B, T, H), "gk": (B, T, H, K), "gv": (B, T, H, V), "A": (B, T, H, K, V)}
    name = {"scalar": "g", "vector_k": "gk", "vector_v": "gv", "full": "A"}[form]
    x = -(0.05 + 0.5 * torch.rand(*shape[name], generator=gen, dtype=torch.float64))
    x[:, list(RESETS)] = float("-inf")
    if name in ("gk", "gv", "A"):
        x[0, 20, 0] = float("-inf")  # a reset along one feature of one head
    return {name: x}


def run(backend, s, e, i, h0, decay, dtype):
    leaves = {"s": s, "e": e, "i": i, "h0": h0, **decay}
    leaves = {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in leaves.items()}
    y, ht = eos_recurrence(leaves["s"], leaves["e"], leaves["i"], h0=leaves["h0"], output_final_state=True,
                           backend=backend, **{k: leaves[k] for k in decay})
    gen = torch.Generator().manual_seed(7)
    wy, wh = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in (y, ht))  # the same in every dtype
    loss = (y * wy).sum() + (ht * wh).sum()
    loss.backward()
    return y, ht, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["scalar", "vector_k", "vector_v", "full"])
def test_a_log_decay_of_minus_inf_resets_the_state(backend, form):
    gen = torch.Generator().manual_seed(0)
    B_ = B if backend == "torch" else TRITON_B
    K_, V_ = SCAN_KV if backend == "triton" and form == "full" else (K, V)
    s, e, i = (torch.randn(B_, T, H, D, generator=gen, dtype=torch.float64) for D in (K_, K_, V_))
    h0 = torch.randn(B_, H, K_, V_, generator=gen, dtype=torch.float64)
    decay = gates(form, gen, B_, K_, V_)
    ref = run("reference", s, e, i, h0, decay, torch.float64)
    dtype = torch.float64 if backend == "torch" else torch.float32
    got = run(backend, s, e, i, h0, decay, dtype)
    # the state after a reset at the last token is the last write alone
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[0]).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert rel_error(got[0], ref[0]) < tol and rel_error(got[1], ref[1]) < tol
    for k in ref[2]:
        assert torch.isfinite(got[2][k]).all(), k
        assert rel_error(got[2][k], ref[2][k]) < max(tol, 1e-6 if dtype == torch.float64 else tol), k


def test_the_reset_of_the_step_matches_the_loop():
    gen = torch.Generator().manual_seed(1)
    s, e, i = (torch.randn(B, 1, H, D, generator=gen) for D in (K, K, V))
    state = torch.randn(B, H, K, V, generator=gen)
    g = torch.full((B, H), float("-inf"))
    y, new = eos_step(s[:, 0], e[:, 0], i[:, 0], state.clone(), g=g, backend="torch")
    torch.testing.assert_close(new, e[:, 0, :, :, None] * i[:, 0, :, None, :])
    ref, _ = eos_recurrence(s, e, i, g=g[:, None], h0=state, backend="reference")
    torch.testing.assert_close(y, ref[:, 0])
