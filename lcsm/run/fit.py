"""Power-law fits of an ablation's results, y = a·x^b per value of an axis (grid recipe `fit:`).

The scaling-law recipe (recipes/ablations/scaling.yaml) fits the validation loss against training
compute per model kind, L = a·C^b, as the Scaling Laws paper (arXiv 2406.16690, Table 3) does for
TNL, HGRN2, cosFormer2 and LLaMA. The fit is ordinary least squares of ln y on ln x; the standard
errors come from the residual variance with n − 2 degrees of freedom, so they are honest about
scatter around the line (seeds and sizes are all points) but not about a curved law: R² and the
plot show that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lcsm.config.ablation import GridRecipe
from lcsm.run.checkpoint import atomic_write
from lcsm.run.modelstats import si

X_LABELS = {
    "compute": "training compute C (FLOPs: 3 × forward FLOPs/token × tokens)",
    "parameters": "non-embedding parameters N",
    "tokens": "training tokens D",
}
X_FIELDS = {"compute": "compute", "parameters": "non_embedding_parameters", "tokens": "tokens"}


@dataclass
class PowerLaw:
    """y = a·x^b with standard errors of b and of ln a."""

    a: float
    b: float
    se_b: float
    se_log_a: float
    r2: float
    n: int

    def __call__(self, x: float) -> float:
        return self.a * x**self.b


def fit_power_law(xs: list[float], ys: list[float]) -> PowerLaw:
    """Least squares of ln y = ln a + b ln x. Needs two distinct positive x (the errors need three
    points: with two the line is exact and they are nan)."""
    if len(xs) != len(ys):
        raise ValueError("x and y differ in length")
    if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        raise ValueError("a power law needs positive x and y")
    n = len(xs)
    u, v = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mu, mv = sum(u) / max(n, 1), sum(v) / max(n, 1)
    suu = sum((a - mu) ** 2 for a in u)
    if n < 2 or suu == 0:
        raise ValueError("a power law needs at least two distinct x")
    b = sum((a - mu) * (c - mv) for a, c in zip(u, v)) / suu
    log_a = mv - b * mu
    sse = sum((c - log_a - b * a) ** 2 for a, c in zip(u, v))
    sst = sum((c - mv) ** 2 for c in v)
    s2 = sse / (n - 2) if n > 2 else float("nan")
    return PowerLaw(
        a=math.exp(log_a),
        b=b,
        se_b=math.sqrt(s2 / suu),
        se_log_a=math.sqrt(s2 * (1 / n + mu**2 / suu)),
        r2=1 - sse / sst if sst > 0 else 1.0,
        n=n,
    )


@dataclass
class GroupFit:
    label: str  # the value of fit.by ("all" without it)
    points: list[tuple[float, float]]  # (x, y), one per finished point (every seed)
    law: PowerLaw | None
    problem: str | None = None  # why there is no law


def fits(grid: GridRecipe, rows: list[dict], summary: list[dict]) -> list[GroupFit]:
    """One fit per value of fit.by over the finished points; where best_of applies, only the
    points at their combination's best value (every seed of it)."""
    spec = grid.fit
    key = grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    best = {tuple(s["labels"][a] for a in axes): s["best"] for s in summary}
    field = X_FIELDS[spec.x]
    groups: dict[str, list[tuple[float, float]]] = {}
    order = [str(v) for v in dict.fromkeys(r[spec.by] for r in rows)] if spec.by else ["all"]
    for label in order:
        groups[label] = []
    for r in rows:
        if r["status"] != "done" or r.get(spec.y) is None or r.get(field) is None:
            continue
        if key is not None and r[key] != best.get(tuple(r[a] for a in axes)):
            continue
        groups[str(r[spec.by]) if spec.by else "all"].append((float(r[field]), float(r[spec.y])))
    out = []
    for label, pts in groups.items():
        xs = sorted({x for x, _ in pts})
        if len(xs) < 2:
            out.append(GroupFit(label, pts, None, f"{len(pts)} finished point(s) at {len(xs)} distinct {spec.x} value(s): need 2"))
            continue
        try:
            out.append(GroupFit(label, pts, fit_power_law([p[0] for p in pts], [p[1] for p in pts])))
        except ValueError as e:
            out.append(GroupFit(label, pts, None, str(e)))
    return out


def _num(x: float, digits: int = 4) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def markdown(grid: GridRecipe, results: list[GroupFit]) -> str:
    spec = grid.fit
    by = spec.by or "-"
    lines = [
        f"## Fit: {spec.y} = a · {spec.x}^b" + (f" per {by}" if spec.by else ""),
        "",
        f"x: {X_LABELS[spec.x]}. Least squares of ln {spec.y} on ln {spec.x} over the finished points (each seed a point"
        + ("; each combination at its best " + grid.best_of.key if grid.best_of else "")
        + "); ± one standard error from the residuals (n − 2 degrees of freedom).",
        "",
    ]
    ref = spec.reference
    head = [by, "a", "b", "± se(b)", "n", "R²", f"{spec.x} range", f"{spec.y} range"]
    if ref:
        head += ["reference b", "(b − ref) / se"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in results:
        xs, ys = [p[0] for p in g.points], [p[1] for p in g.points]
        xr = f"{si(min(xs))}–{si(max(xs))}" if xs else "-"
        yr = f"{min(ys):.3f}–{max(ys):.3f}" if ys else "-"
        if g.law is None:
            cells = [g.label, "-", "-", "-", str(len(g.points)), "-", xr, yr]
        else:
            law = g.law
            cells = [g.label, f"{law.a:.4g}" if math.isnan(law.se_log_a) else f"{law.a:.4g} (×/÷ {math.exp(law.se_log_a):.3g})",
                     _num(law.b), _num(law.se_b), str(law.n), _num(law.r2, 3), xr, yr]
        if ref:
            r = ref.get(g.label)
            z = (g.law.b - r) / g.law.se_b if (g.law is not None and r is not None and g.law.se_b > 0) else None
            cells += ["-" if r is None else f"{r:.4f}", "-" if z is None or math.isnan(z) else f"{z:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if ref and spec.reference_source:
        lines += ["", f"Reference exponents: {spec.reference_source}."]
    missing = [f"- {g.label}: {g.problem}" for g in results if g.law is None]
    if missing:
        lines += ["", "No fit:", *missing]
    return "\n".join(lines) + "\n"


def plot(grid: GridRecipe, results: list[GroupFit], path: Path) -> Path | None:
    """y against x on log axes, the points of each group and its fitted line. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    spec = grid.fit
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, g in enumerate(results):
        if not g.points:
            continue
        c = colors[n % len(colors)]
        label = g.label
        if g.law is not None:
            label += f": b = {g.law.b:.4f}" if math.isnan(g.law.se_b) else f": b = {g.law.b:.4f} ± {g.law.se_b:.4f}"
        ax.scatter([p[0] for p in g.points], [p[1] for p in g.points], color=c, s=18, label=label, zorder=3)
        if g.law is not None:
            lo, hi = min(p[0] for p in g.points), max(p[0] for p in g.points)
            xs = [lo * (hi / lo) ** (k / 50) for k in range(51)]
            ax.plot(xs, [g.law(x) for x in xs], color=c, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    # losses span a narrow range: plain numbers on the y ticks, not 3.2×10^0
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.set_xlabel(X_LABELS[spec.x])
    ax.set_ylabel(f"{spec.y} (validation)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{grid.name}: {spec.y} = a·{spec.x}^b" + (f" per {spec.by}" if spec.by else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))
    plt.close(fig)
    return path
