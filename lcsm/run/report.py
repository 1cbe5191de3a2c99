"""The report of an ablation directory: results.csv, results.md (best_of applied, mean ± std over
seeds), failures.json and a plot, rebuilt from the run directories at any time."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import yaml
from pydantic import ValidationError

from lcsm.config.ablation import LOWER_IS_BETTER, METRICS, GridRecipe
from lcsm.config.base import RecipeError
from lcsm.run import fit as fitting
from lcsm.run import slices as slicing
from lcsm.run.ablate import point_status, read_json, read_metric, write_json
from lcsm.run.checkpoint import atomic_write, write_text
from lcsm.run.evaluate import read_eval
from lcsm.run.modelstats import run_stats

# --------------------------------------------------------------------------- the report


def load_ablation(out_dir: str | Path) -> tuple[GridRecipe, list[dict]]:
    out_dir = Path(out_dir)
    data = read_json(out_dir / "ablation.json")
    if data is None:
        raise RecipeError(f"{out_dir}: no readable ablation.json here; is this an lcsm ablate directory?")
    try:
        return GridRecipe.model_validate(data["grid"]), list(data["points"])
    except (KeyError, TypeError, ValidationError) as err:
        raise RecipeError(f"{out_dir}/ablation.json: not what lcsm ablate writes ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def collect(out_dir: str | Path) -> tuple[GridRecipe, list[dict]]:
    """One row per point from the run directories: axes, seed, status, metrics, error."""
    grid, points = load_ablation(out_dir)
    rows = []
    for p in points:
        run_dir = Path(out_dir) / "runs" / p["id"]  # where expand() put it: the folder may have moved since
        status = point_status(run_dir)
        info = read_json(run_dir / "point.json") or {}
        record = read_eval(run_dir / "eval.json")  # the training's evaluation (lcsm eval writes beside it)
        ev = record.metrics if record is not None else {}
        row = {"id": p["id"], **p["labels"], "seed": p["seed"], "status": status}
        row["step"] = record.step if record is not None and record.step is not None else info.get("step")
        for m in METRICS:
            row[m] = read_metric(ev, m) if status == "done" else None
        metric = grid.report_metric
        if metric not in METRICS:
            row[metric] = read_metric(ev, metric) if status == "done" else None
        row["elapsed_s"] = info.get("elapsed_s")
        row["error"] = info.get("error") if status == "failed" else None
        row["_values"] = p["values"]
        rows.append(row)
    return grid, rows


def summarise(grid: GridRecipe, rows: list[dict]) -> list[dict]:
    """Groups over every axis but best_of.key: per value of that key the mean over seeds, the best
    value chosen by best_of, then the mean ± std over seeds there. Rows in grid order."""
    metric, axes = grid.report_metric, list(grid.grid)
    key = grid.best_of.key if grid.best_of else None
    sel_metric = grid.best_of.metric if grid.best_of else metric
    sel_mode = grid.best_of.resolved_mode if grid.best_of else grid.report_mode
    groups: dict[tuple, dict] = {}
    for row in rows:
        g = tuple(row[a] for a in axes if a != key)
        entry = groups.setdefault(g, {"labels": {a: row[a] for a in axes if a != key}, "values": {a: row["_values"][a] for a in axes if a != key}, "by": {}, "failed": 0, "pending": 0})
        by = entry["by"].setdefault(row[key] if key else "-", {"sel": [], "metric": []})
        if row["status"] == "done":
            if row.get(sel_metric) is not None:
                by["sel"].append(row[sel_metric])
            if row.get(metric) is not None:
                by["metric"].append(row[metric])
        elif row["status"] == "failed":
            entry["failed"] += 1
        else:
            entry["pending"] += 1
    out = []
    for entry in groups.values():
        scored = {k: _mean(v["sel"]) for k, v in entry["by"].items() if v["sel"]}
        best = None
        if scored:
            best = (max if sel_mode == "max" else min)(scored, key=lambda k: scored[k])
        vals = entry["by"][best]["metric"] if best is not None else []
        out.append({
            **entry,
            "best": best if key else None,
            "mean": _mean(vals) if vals else None,
            "std": _std(vals) if vals else None,
            "n": len(vals),
            "sweep": {k: _mean(v["metric"]) if v["metric"] else None for k, v in entry["by"].items()},
        })
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def mean_std(s: dict, digits: int = 4) -> str:
    """A summary cell: '-' without results, the value for one seed, else 'mean ± std'."""
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f}" if s["n"] == 1 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(grid: GridRecipe, rows: list[dict], summary: list[dict]) -> str:
    metric, key = grid.report_metric, grid.best_of.key if grid.best_of else None
    axes = [a for a in grid.grid if a != key]
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    sel = f"; best {key} by {grid.best_of.metric} ({grid.best_of.resolved_mode})" if key else ""
    lines += [
        f"{len(rows)} points ({done} done, {failed} failed, {len(rows) - done - failed} not run); "
        + (f"{metric}: mean ± std over seeds {', '.join(map(str, grid.seeds))}{sel}." if len(grid.seeds) > 1
           else f"{metric} of seed {grid.seeds[0]}{sel}."),
        "",
    ]
    head = axes + ([f"best {key.split('.')[-1]}"] if key else []) + [metric, "seeds"] + ([f"{metric} per {key.split('.')[-1]}"] if key else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in summary:
        cells = [s["labels"][a] for a in axes]
        if key:
            cells.append(s["best"] or "-")
        cells.append(mean_std(s))
        cells.append(str(s["n"]) + (f" ({s['failed']} failed)" if s["failed"] else ""))
        if key:
            cells.append(", ".join(f"{k}: {_fmt(v, 3)}" for k, v in s["sweep"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    pivot = _pivot(grid, summary)
    if pivot:
        lines += ["", pivot]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r['id']}`: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(lines) + "\n"


def _pivot(grid: GridRecipe, summary: list[dict]) -> str | None:
    """With plot.x: one row per line (the other axes), one column per (panel, x)."""
    x, panel = grid.plot.x, grid.plot.panel
    if x is None:
        return None
    key = grid.best_of.key if grid.best_of else None
    rest = [a for a in grid.grid if a not in (key, x, panel)]
    cols = list(dict.fromkeys((s["labels"][panel] if panel else "", s["labels"][x]) for s in summary))
    table: dict[tuple, dict] = {}
    for s in summary:
        r = tuple(s["labels"][a] for a in rest)
        table.setdefault(r, {})[(s["labels"][panel] if panel else "", s["labels"][x])] = s["mean"]
    head = [" / ".join(rest) or "variant"] + [f"{p} {x.split('.')[-1]}={v}".strip() for p, v in cols]
    lines = [f"{grid.report_metric} by {x}" + (f" and {panel}" if panel else "") + ":", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r, cells in table.items():
        lines.append("| " + " | ".join([" / ".join(r) or "-"] + [_fmt(cells.get(c), 3) for c in cols]) + " |")
    return "\n".join(lines)


def write_csv(path: Path, grid: GridRecipe, rows: list[dict]) -> None:
    fields = ["id", *grid.grid, "seed", "status", "step", *METRICS]
    if grid.report_metric not in fields:
        fields.append(grid.report_metric)
    fields += list(grid.stats) + (["non_embedding_parameters", "flops_per_token", "tokens", "compute"] if grid.fit else [])
    fields = list(dict.fromkeys(fields))
    fields += ["elapsed_s", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    write_text(path, buf.getvalue())


def plot(grid: GridRecipe, summary: list[dict], path: Path) -> Path | None:
    """The metric against plot.x, one line per combination of the other axes (or bars without x),
    one panel per value of plot.panel. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric, x, panel = grid.report_metric, grid.plot.x, grid.plot.panel
    key = grid.best_of.key if grid.best_of else None
    rest = [a for a in grid.grid if a not in (key, x, panel)]
    panels = list(dict.fromkeys(s["labels"][panel] for s in summary)) if panel else [None]
    fig, axs = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) if x else max(6, 0.5 * len(summary) / len(panels) + 3) * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = list(dict.fromkeys(tuple(s["labels"][a] for a in rest) for s in summary))
    for ax, pv in zip(axs[0], panels):
        mine = [s for s in summary if panel is None or s["labels"][panel] == pv]
        if x:
            for n, line in enumerate(lines):
                pts = sorted((float(s["values"][x]), s["mean"], s["std"]) for s in mine if tuple(s["labels"][a] for a in rest) == line and s["mean"] is not None)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                                color=colors[n % len(colors)], linestyle="-" if n < len(colors) else "--", label=" / ".join(line) or metric)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({float(v) for v in grid.grid[x]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(x)
            if metric in ("accuracy", "token_accuracy"):
                ax.set_ylim(-0.02, 1.02)
        else:
            names = [" / ".join(s["labels"][a] for a in rest) or "-" for s in mine]
            means = [s["mean"] if s["mean"] is not None else float("nan") for s in mine]
            bars = ax.bar(range(len(mine)), means, yerr=[s["std"] or 0 for s in mine], capsize=3, color=[colors[n % len(colors)] for n in range(len(mine))])
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
            ax.set_xticks(range(len(mine)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            finite = [m for m in means if m == m]
            if finite and metric in LOWER_IS_BETTER:
                lo, hi = min(finite), max(finite)
                ax.set_ylim(max(0, lo - 0.1 * (hi - lo + 1e-3) - 0.02), hi + 0.1 * (hi - lo + 1e-3) + 0.02)
        ax.set_title(f"{panel} {pv}" if panel else grid.name)
        ax.set_ylabel(metric + (f" (best {key.split('.')[-1]})" if key else ""))
        ax.grid(alpha=0.3)
    if x and any(len(lines) for _ in [0]):
        axs[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{grid.name}: {metric}" + (f", mean ± std over {len(grid.seeds)} seeds" if len(grid.seeds) > 1 else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))
    plt.close(fig)
    return path


def add_stats(out_dir: Path, rows: list[dict]) -> None:
    """Each row gets its model's statistics (parameters, state, FLOPs per token) and, once
    finished, its training tokens and compute, from its config.yaml (lcsm/run/modelstats.py)."""
    for row in rows:
        try:
            recipe = yaml.safe_load((out_dir / "runs" / row["id"] / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue  # a point that never started has no config.yaml yet
        if isinstance(recipe, dict) and "model" in recipe and "task" in recipe:
            row.update(run_stats(recipe, row["step"] if row["status"] == "done" else None))


def extras(out_dir: Path, grid: GridRecipe, rows: list[dict], summary: list[dict]) -> tuple[str, list[Path], str | None]:
    """The sections after the main table (slices, model statistics, fit) as markdown, the PNGs
    they draw, and the fit section alone (the command prints it)."""
    parts, pngs, fit_md = [], [], None
    if grid.slices is not None:
        table = slicing.per_slice(grid, out_dir, rows, summary)
        parts.append(slicing.markdown(grid, table))
        if any(t["curve"] for t in table):
            png = slicing.plot(grid, table, out_dir / f"{grid.slices.metric or grid.report_metric}_by_{grid.slices.by}.png")
            pngs += [png] if png else []
    elif grid.stats:
        parts.append(slicing.stats_markdown(grid, rows, summary))
    if grid.fit is not None:
        results = fitting.fits(grid, rows, summary)
        fit_md = fitting.markdown(grid, results)
        parts.append(fit_md)
        if any(g.points for g in results):
            png = fitting.plot(grid, results, out_dir / "fit.png")
            pngs += [png] if png else []
    return "\n".join(parts), pngs, fit_md


def build_report(out_dir: str | Path) -> dict:
    """results.csv, results.md, failures.json and the plots, from the run directories.
    Returns {"csv", "md", "failures", "png", "extra_png", "fit", "rows", "summary"}."""
    out_dir = Path(out_dir)
    grid, rows = collect(out_dir)
    summary = summarise(grid, rows)
    if grid.stats or grid.fit:
        add_stats(out_dir, rows)
    more, extra_png, fit_md = extras(out_dir, grid, rows, summary)
    write_csv(out_dir / "results.csv", grid, rows)
    write_text(out_dir / "results.md", markdown(grid, rows, summary) + ("\n" + more if more else ""))
    failures = [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    write_json(out_dir / "failures.json", failures)
    png, missing = None, None
    if not any(s["mean"] is not None for s in summary):
        missing = "no finished point yet"
    else:
        png = plot(grid, summary, out_dir / f"{grid.report_metric}.png")
        if png is None:
            missing = "matplotlib is not installed; pip install 'lcsm[plots]', then lcsm ablate --report DIR"
    return {"csv": out_dir / "results.csv", "md": out_dir / "results.md", "failures": out_dir / "failures.json", "png": png,
            "png_missing": missing, "extra_png": extra_png, "fit": fit_md, "rows": rows, "summary": summary}
