"""The decay of one recurrence call: the one reader of the canonical log-decay tensors.

Every backend, LASP-2, Mixture-of-Memories and decoding go through `Decay`; no other module knows
which tensor is static, which is per token, or how they combine. The tensors (layout [B, T, H, D]):

    g    [B,T,H]     | [H]        log of a scalar decay per head
    gk   [B,T,H,K]   | [H,K]      log decay along K
    gv   [B,T,H,V]   | [H,V]      log decay along V
    dt   [B,T,H,V]   with A [H,K,V]: log o = dt ⊗ A (the selective-SSM form)
    A    [B,T,H,K,V] | [H,K,V]    with dt absent: the full log decay itself
    w    [B,T,H,K]                the removal key of a delta-rule transition (I - w eᵀ) D
    beta [B,T,H]     | [H]        with w only: the delta rule's write strength, e -> beta·e

All log decays are <= 0 and any combination may be given (their sum is the log decay); none means
o = 1. With w the transition of a token is the K×K matrix (I - w_t e_tᵀ) D_t applied to the state
from the left, D_t the element-wise decay (g and/or gk only: w with gv, dt or A is refused), e_t
the token's expand; `transition` applies it, and the delta backends read w from here.

beta lets a caller give the write key as beta·e without forming it (DeltaNet: e = w = k): the
recurrence is the same as with e replaced by beta ⊙ e. `fold_beta` forms that product; the entry
points (lcsm/kernels/api.py) fold it for every path but the Triton kernels and the torch path of
the delta rule, which take beta with w = e (the same tensor) in fla's form: one state product per
chunk instead of three.

The second form of g, gk, gv and A is static: the same at every token. A one-token decay
(`step=True`, for decoding) holds the same tensors without the time axis: g [B,H], gk [B,H,K],
gv [B,H,V], dt [B,H,V], A [B,H,K,V], w [B,H,K]; static tensors keep their static shapes.

A log decay of -inf is a hard reset (o = 0). Backends that combine log decays by differences of
cumulative sums (the chunked ones, LASP-2) read every log decay floored at LOG_ZERO: exp(LOG_ZERO)
is exactly 0 in fp32 and fp64, so o = 0 exactly, and the differences stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

NAMES = ("g", "gk", "gv", "dt", "A", "w", "beta")
STATIC_RANK = {"g": 1, "gk": 2, "gv": 2, "A": 3, "beta": 1}  # dt and w exist per token only
FEATURE_DIMS = {"g": 0, "gk": 1, "gv": 1, "dt": 1, "A": 2, "w": 1, "beta": 0}  # dims after the head axis
LOG_ZERO = -1000.0


def _fail(name: str, t: torch.Tensor, expected: str) -> None:
    raise ValueError(f"eos_recurrence: '{name}' has shape {tuple(t.shape)}; expected {expected}")


@dataclass(frozen=True)
class Decay:
    """The oscillation of one call (see the module docstring for the tensors)."""

    g: torch.Tensor | None = None
    gk: torch.Tensor | None = None
    gv: torch.Tensor | None = None
    dt: torch.Tensor | None = None
    A: torch.Tensor | None = None
    w: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    step: bool = False  # one token: per-token tensors have no time axis

    @classmethod
    def of(cls, tensors: dict | None = None, step: bool = False, **more) -> "Decay":
        """From a dict and/or keywords of the canonical names (None entries ignored)."""
        given = {**(tensors or {}), **more}
        unknown = set(given) - set(NAMES)
        if unknown:
            raise ValueError(f"eos_recurrence: unknown decay tensor(s) {sorted(unknown)}; allowed: {', '.join(NAMES)}")
        return cls(**{k: v for k, v in given.items() if v is not None}, step=step)

    # ------------------------------------------------------------------ structure

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, getattr(self, n)) for n in NAMES if getattr(self, n) is not None]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The given tensors by name (to pass on as keywords)."""
        return dict(self.items())

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items())

    @property
    def empty(self) -> bool:
        """o = 1 at every token and no delta part."""
        return not self.items()

    @property
    def separable(self) -> bool:
        """Element-wise and separable in log space (g, gk, gv only): the chunked kernels' forms."""
        return self.dt is None and self.A is None and self.w is None

    @property
    def delta(self) -> bool:
        """A delta-rule transition (I - w eᵀ) D on top of the element-wise decay."""
        return self.w is not None

    def is_static(self, name: str) -> bool:
        """The same tensor at every token ([H], [H,K], [H,V], [H,K,V])."""
        x = getattr(self, name)
        return x is not None and name in STATIC_RANK and x.dim() == STATIC_RANK[name]

    def _lead(self) -> int:
        """Axes before the head axis of a per-token tensor: [B,T] (2) or [B] for one token (1)."""
        return 1 if self.step else 2

    def check(self, B: int, T: int, H: int, K: int, V: int) -> None:
        """Raise ValueError naming the tensor whose shape does not fit [B,T,H,K,V]."""
        lead = (B,) if self.step else (B, T)
        where = "[B,H" if self.step else "[B,T,H"
        feats = {"g": (), "gk": (K,), "gv": (V,), "dt": (V,), "A": (K, V), "w": (K,), "beta": ()}
        letters = {"g": "", "gk": ",K", "gv": ",V", "dt": ",V", "A": ",K,V", "w": ",K", "beta": ""}
        for name, x in self.items():
            per_token = (*lead, H, *feats[name])
            static = (H, *feats[name])
            ok = [per_token, static] if name in STATIC_RANK else [per_token]
            if tuple(x.shape) not in ok:
                allowed = f"{where}{letters[name]}] = {list(per_token)} per token"
                if name in STATIC_RANK:
                    allowed += f" or [H{letters[name]}] = {list(static)} static"
                _fail(name, x, allowed)
        if self.dt is not None and (self.A is None or tuple(self.A.shape) != (H, K, V)):
            raise ValueError(f"eos_recurrence: 'dt' needs 'A' of shape [H,K,V] = {[H, K, V]}")
        self.check_delta()

    def check_delta(self) -> None:
        """Raise ValueError if w comes with a decay it does not compose with (gv, dt, A), or beta without w."""
        if self.beta is not None and self.w is None:
            raise ValueError("eos_recurrence: 'beta' (the delta rule's write strength) needs the removal key 'w'")
        if self.w is not None:
            other = [n for n in ("gv", "dt", "A") if getattr(self, n) is not None]
            if other:
                raise ValueError(
                    f"eos_recurrence: the delta rule ('w') composes with the decays 'g' and 'gk' only (a K×K "
                    f"transition (I - w eᵀ) D with D along K); got {', '.join(repr(n) for n in other)}"
                )

    # ------------------------------------------------------------------ reshaping

    def map(self, fn: Callable[[torch.Tensor, bool], torch.Tensor]) -> "Decay":
        """Apply fn(tensor, is_static) to every tensor; the result's form is read from its shape."""
        return replace(self, **{n: fn(x, self.is_static(n)) for n, x in self.items()})

    def slice(self, start: int, end: int) -> "Decay":
        """Tokens [start, end): per-token tensors sliced along time, static ones unchanged."""
        return self.map(lambda x, static: x if static else x[:, start:end])

    def at(self, t: int) -> "Decay":
        """The one-token decay of token t (decoding)."""
        return replace(self.map(lambda x, static: x if static else x[:, t]), step=True)

    def per_token(self, B: int, T: int) -> "Decay":
        """Every static tensor broadcast to per-token shape (a view)."""
        return self.map(lambda x, static: x.expand(B, T, *x.shape) if static else x)

    def masked(self, keep: torch.Tensor) -> "Decay":
        """o = 1 and no delta part at the (token, head) entries where keep [B,T,H] (bool) is False:
        the memory of that head is left exactly as it was (Mixture-of-Memories' unchosen memories)."""
        B, T = keep.shape[:2]

        def mask(x: torch.Tensor, static: bool) -> torch.Tensor:
            x = x.expand(B, T, *x.shape) if static else x
            k = keep.view(*keep.shape, *[1] * (x.dim() - 3))
            return torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device))  # where: -inf stays safe

        return self.map(mask)

    def fold_scalar(self) -> "Decay":
        """g added into gk when both are given (one decay along K; autograd sees the sum)."""
        if self.g is None or self.gk is None:
            return self
        g, gk = self.g, self.gk
        if self.is_static("g") and self.is_static("gk"):
            return replace(self, g=None, gk=gk + g[:, None])
        lead = g.shape[: self._lead()] if not self.is_static("g") else gk.shape[: self._lead()]
        if self.is_static("gk"):
            gk = gk.expand(*lead, *gk.shape)
        if self.is_static("g"):
            g = g.expand(*lead, -1)
        return replace(self, g=None, gk=gk + g[..., None])

    def fold_beta(self, e: torch.Tensor) -> tuple[torch.Tensor, "Decay"]:
        """(beta ⊙ e, this decay without beta): the same recurrence with the write key formed
        (e [B,T,H,K], or [B,H,K] for one token). Without beta: (e, self)."""
        if self.beta is None:
            return e, self
        return e * self.beta.to(e.dtype)[..., None], replace(self, beta=None)

    def beta_per_token(self, B: int, T: int) -> torch.Tensor | None:
        """beta as [B,T,H] (a static [H] broadcast, a view); None without it."""
        if self.beta is None:
            return None
        return self.beta.expand(B, T, -1) if self.is_static("beta") else self.beta

    def floored(self) -> "Decay":
        """Every log decay clamped at LOG_ZERO (dt and w untouched: dt ⊗ A is floored where formed)."""
        return replace(self, **{n: x.clamp_min(LOG_ZERO) for n, x in self.items() if n in ("g", "gk", "gv", "A")})

    # ------------------------------------------------------------------ reading

    def log_step(self, t: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """log o at token t (t ignored for a one-token decay), broadcastable to [B,H,K,V]; None
        for o = 1. Exact: a -inf stays -inf."""
        def pick(name):
            x = getattr(self, name)
            if x is None:
                return None
            x = x if (self.step or self.is_static(name)) else x[:, t]
            return x.to(dtype)

        out = None

        def add(x):
            nonlocal out
            out = x if out is None else out + x

        g, gk, gv, dt, A = (pick(n) for n in ("g", "gk", "gv", "dt", "A"))
        if g is not None:
            add(g[..., None, None])
        if gk is not None:
            add(gk[..., None])
        if gv is not None:
            add(gv[..., None, :])
        if dt is not None:
            add(dt[..., None, :] * A)
        elif A is not None:
            add(A)
        return out

    def transition(self, m: torch.Tensor, t: int | None, e: torch.Tensor) -> torch.Tensor:
        """One token's transition applied to the state m [B,H,K,V]: (I - w_t e_tᵀ)(o_t ⊙ m), i.e.
        o ⊙ m - w (eᵀ (o ⊙ m)) with eᵀ contracting over K (e [B,H,K] the token's expand; t
        ignored for a one-token decay). Without w it is o_t ⊙ m. In m's dtype; -inf stays exact.
        A decay with beta is folded first (fold_beta): e here is the write key itself."""
        if self.beta is not None:
            raise ValueError("Decay.transition: fold beta into e first (Decay.fold_beta)")
        log_o = self.log_step(t, m.dtype)
        if log_o is not None:
            m = torch.exp(log_o) * m
        if self.w is not None:
            w = (self.w if self.step else self.w[:, t]).to(m.dtype)
            m = m - w[..., :, None] * torch.einsum("bhk,bhkv->bhv", e.to(m.dtype), m)[..., None, :]
        return m

    def along_k(self, B: int, T: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The per-token log decay along K, [B,T,H,K] (or [B,T,H,1] for a scalar alone), floored."""
        out = None
        if self.g is not None:
            g = self.g.expand(B, T, -1) if self.is_static("g") else self.g
            out = g.to(dtype).clamp_min(LOG_ZERO)[..., None]
        if self.gk is not None:
            gk = self.gk.expand(B, T, *self.gk.shape) if self.is_static("gk") else self.gk
            gk = gk.to(dtype).clamp_min(LOG_ZERO)
            out = gk if out is None else gk + out
        return out

    def along_v(self, B: int, T: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The per-token log decay along V, [B,T,H,V], floored; None without gv."""
        if self.gv is None:
            return None
        gv = self.gv.expand(B, T, *self.gv.shape) if self.is_static("gv") else self.gv
        return gv.to(dtype).clamp_min(LOG_ZERO)

    def full(self, B: int, T: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The non-separable part dt ⊗ A (or A), [B,T,H,K,V], floored; None without it."""
        if self.dt is not None:
            return (self.dt.to(dtype)[:, :, :, None, :] * self.A.to(dtype)).clamp_min(LOG_ZERO)
        if self.A is not None:
            A = self.A.expand(B, T, *self.A.shape) if self.is_static("A") else self.A
            return A.to(dtype).clamp_min(LOG_ZERO)
        return None

    def chunk_cumsum(self, B: int, T: int, chunk: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Chunk-local inclusive cumsums of the log decay along K and along V, over T padded to a
        multiple of `chunk` (padding tokens decay nothing): ([B,T',H,K|1], [B,T',H,V]) or None each."""
        pad = (-T) % chunk

        def cum(x):
            if x is None:
                return None
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
            Bx, Tp, H, D = x.shape
            return torch.cumsum(x.reshape(Bx, Tp // chunk, chunk, H, D), dim=2).reshape(Bx, Tp, H, D)

        return cum(self.along_k(B, T, dtype)), cum(self.along_v(B, T, dtype))

    def cumsum(self, B: int, T: int, dtype: torch.dtype) -> "Decay":
        """The inclusive cumulative log decay along T as a Decay of per-token tensors (static
        tensors become t·x; dt is summed with A kept, since Σ dt ⊗ A = (Σ dt) ⊗ A), floored."""
        steps = None

        def cum(x: torch.Tensor, static: bool) -> torch.Tensor:
            nonlocal steps
            x = x.to(dtype)
            if static:
                if steps is None:
                    steps = torch.arange(1, T + 1, device=x.device, dtype=dtype)
                return (steps.view(T, *[1] * x.dim()) * x.clamp_min(LOG_ZERO)).expand(B, T, *x.shape)
            return torch.cumsum(x.clamp_min(LOG_ZERO), dim=1)

        out = {n: cum(x, self.is_static(n)) for n, x in self.items() if n not in ("A", "w", "beta")}
        if self.A is not None:
            out["A"] = self.A.to(dtype) if self.dt is not None else cum(self.A, self.is_static("A"))
        return Decay(**out)

    def total(self, B: int, T: int, shape: tuple[int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """The total log decay of these T tokens as one [B,H,K,V] tensor (LASP-2's λ of a slice);
        shape = (H, K, V). A delta-rule decay has no such diagonal total: its slice is the affine
        map m -> P m + S with P from lcsm.kernels.delta_transition, so it is refused here."""
        if self.delta:
            raise ValueError("Decay.total: a delta-rule decay (w) has a K×K transition, not a total log decay; "
                             "use lcsm.kernels.delta_transition for the slice's transition product")
        out = torch.zeros(B, *shape, dtype=dtype, device=device)
        if self.empty or T == 0:
            return out
        return out + self.cumsum(B, T, dtype).log_step(T - 1, dtype)


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for half types; fp64 stays fp64 (the reference and the tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


__all__ = ["Decay", "LOG_ZERO", "NAMES", "state_dtype"]
