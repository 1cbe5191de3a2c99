"""The metric per test slice (grid recipe `slices: {by: num_kv_pairs}`) and the model statistics
(`stats:`) of an ablation, beside its main table.

A point that trains on a mixture of settings and is tested on several (MQAR at 16, 32, 64, ...
key-value pairs) carries the curve accuracy-against-kv-pairs in its eval.json slices; this reads
them at each combination's best best_of value and gives mean ± std over seeds per slice value, a
table with the models' parameters and state sizes beside it, and a plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from lcsm.config.ablation import GridRecipe
from lcsm.run.ablate import read_metric
from lcsm.run.checkpoint import atomic_write
from lcsm.run.evaluate import read_eval
from lcsm.run.modelstats import si

STAT_HEADS = {
    "parameters": "params",
    "non_embedding_parameters": "non-emb params",
    "active_parameters": "active non-emb params",
    "state_size": "state",
    "flops_per_token": "FLOPs/token",
}


def eval_slices(run_dir: Path) -> dict:
    """eval.json's slices (any layout lcsm has written: lcsm/run/evaluate.py's read_eval)."""
    record = read_eval(run_dir / "eval.json")
    return (record.metrics.get("slices") if record is not None else None) or {}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _cell(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, s = _mean_std(xs)
    return f"{m:.3f}" if len(xs) == 1 else f"{m:.3f} ± {s:.3f}"


def stat_cell(name: str, row: dict | None) -> str:
    if row is None or row.get(name) is None:
        return "-"
    text = si(row[name])
    if name == "state_size" and row.get("state_grows"):
        text += f" (KV at {row['context']})"
    return text


def per_slice(grid: GridRecipe, out_dir: Path, rows: list[dict], summary: list[dict]) -> list[dict]:
    """Per summary combination: {labels, values, best, stats (a row of it), curve: {slice value: [metric per seed]}}."""
    spec = grid.slices
    metric = spec.metric or grid.report_metric
    key = grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    out = []
    for s in summary:
        mine = [r for r in rows if all(r[a] == s["labels"][a] for a in axes) and (key is None or r[key] == s["best"])]
        curve: dict[float, list[float]] = {}
        for r in mine:
            if r["status"] != "done":
                continue
            for sl in eval_slices(Path(out_dir) / "runs" / r["id"]).values():
                v, m = sl.get(spec.by), read_metric(sl, metric)
                if isinstance(v, (int, float)) and m is not None:
                    curve.setdefault(float(v), []).append(m)
        stats = next((r for r in mine if r.get("parameters") is not None), None)
        out.append({"labels": s["labels"], "values": s["values"], "best": s["best"], "stats": stats,
                    "curve": dict(sorted(curve.items())), "n": s["n"]})
    return out


def markdown(grid: GridRecipe, table: list[dict]) -> str:
    spec = grid.slices
    metric = spec.metric or grid.report_metric
    key = grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    xs = sorted({x for t in table for x in t["curve"]})
    head = axes + ([f"best {key.split('.')[-1]}"] if key else []) + [STAT_HEADS[x] for x in grid.stats]
    head += [f"{spec.by}={x:g}" for x in xs] + ["seeds"]
    about = (f"Each test slice's {metric} at the best {key} of the combination" if key else f"Each test slice's {metric}")
    about += " (mean ± std over seeds; the value alone for one seed)"
    if grid.stats:
        about += "; parameters and state as lcsm show counts them (state: numbers kept per sequence, all layers)"
    lines = [f"## {metric} per {spec.by}", "", about + ".", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [t["labels"][a] for a in axes] + ([t["best"] or "-"] if key else [])
        cells += [stat_cell(x, t["stats"]) for x in grid.stats]
        cells += [_cell(t["curve"].get(x, [])) for x in xs] + [str(t["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stats_markdown(grid: GridRecipe, rows: list[dict], summary: list[dict]) -> str:
    """The model statistics per combination, when there is no slice table to carry them."""
    key = grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    head = axes + [STAT_HEADS[x] for x in grid.stats]
    about = ("As lcsm show counts them (state: numbers kept per sequence, all layers; FLOPs: forward, "
             "per token, the blocks at the training length).")
    lines = ["## Models", "", about, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        row = next((r for r in rows if all(r[a] == s["labels"][a] for a in axes) and r.get("parameters") is not None), None)
        lines.append("| " + " | ".join([s["labels"][a] for a in axes] + [stat_cell(x, row) for x in grid.stats]) + " |")
    return "\n".join(lines) + "\n"


def plot(grid: GridRecipe, table: list[dict], path: Path) -> Path | None:
    """The metric against the slice field, one line per combination (error bars: std over seeds),
    one panel per value of plot.panel. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    spec = grid.slices
    metric = spec.metric or grid.report_metric
    key = grid.best_of.key if grid.best_of else None
    panel = grid.plot.panel if grid.plot.panel not in (None, key) else None
    rest = [a for a in grid.grid if a not in (key, panel)]
    panels = list(dict.fromkeys(t["labels"][panel] for t in table)) if panel else [None]
    lines = list(dict.fromkeys(tuple(t["labels"][a] for a in rest) for t in table))
    fig, axs = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs_all = sorted({x for t in table for x in t["curve"]})
    for ax, pv in zip(axs[0], panels):
        for t in table:
            if panel and t["labels"][panel] != pv or not t["curve"]:
                continue
            n = lines.index(tuple(t["labels"][a] for a in rest))
            xs = list(t["curve"])
            ms = [_mean_std(t["curve"][x]) for x in xs]
            label = " / ".join(t["labels"][a] for a in rest) or metric
            if grid.stats and "state_size" in grid.stats and t["stats"] is not None:
                label += f" (state {stat_cell('state_size', t['stats'])})"
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                        color=colors[n % len(colors)], linestyle="-" if n < len(colors) else "--", label=label)
        if xs_all and min(xs_all) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if metric in ("accuracy", "token_accuracy"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(spec.by)
        ax.set_ylabel(metric + (f" (best {key.split('.')[-1]})" if key else ""))
        ax.set_title(f"{panel} {pv}" if panel else grid.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{grid.name}: {metric} per {spec.by}" + (f", mean ± std over {len(grid.seeds)} seeds" if len(grid.seeds) > 1 else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))
    plt.close(fig)
    return path
