"""`lcsm plot`: loss and accuracy curves of one or more runs, overlaid, as a PNG (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from lcsm.config.recipe import RecipeError
from lcsm.run import files
from lcsm.run.checkpoint import atomic_write


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl, each sorted by step."""
    path = Path(run) / "metrics.jsonl"
    if not Path(run).is_dir():
        raise RecipeError(f"{run}: no such run directory")
    if not path.exists():
        raise RecipeError(f"{run}: no metrics.jsonl here; is this an lcsm run directory?")
    train, evals = [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError
        except ValueError:
            if n == last:  # being written right now, or cut short when the run was killed
                continue
            raise RecipeError(f"{path}:{n}: not a JSON line of lcsm's metrics") from None
        if record.get("split") == "eval":
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def plot_runs(runs: list[str], output: str | None = None) -> Path:
    """Write the curves PNG; returns its path. Panels: loss (train solid, eval dashed), then eval
    accuracy when a run has one, then bits per byte for text runs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RecipeError("lcsm plot needs matplotlib: pip install 'lcsm[plots]'") from None
    data = {str(run): read_metrics(run) for run in runs}
    has_acc = any(not any("bits_per_byte" in r for r in ev) and ev for _, ev in data.values())
    has_bpb = any(any("bits_per_byte" in r for r in ev) for _, ev in data.values())
    panels = ["loss"] + (["accuracy"] if has_acc else []) + (["bits_per_byte"] if has_bpb else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    names = _labels(list(data))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, ((run, (train, evals)), name) in enumerate(zip(data.items(), names)):
        color = colors[n % len(colors)]
        if train:
            axes["loss"].plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{name} train")
        if evals:
            steps = [r["step"] for r in evals]
            axes["loss"].plot(steps, [r["loss"] for r in evals], "--", color=color, marker=".", label=f"{name} eval")
            if "accuracy" in axes and "bits_per_byte" not in evals[0]:
                axes["accuracy"].plot(steps, [r["accuracy"] for r in evals], color=color, marker=".", label=name)
            if "bits_per_byte" in axes and "bits_per_byte" in evals[0]:
                axes["bits_per_byte"].plot(steps, [r["bits_per_byte"] for r in evals], color=color, marker=".", label=name)
    titles = {"loss": "loss (train, eval dashed)", "accuracy": "eval accuracy", "bits_per_byte": "eval bits per byte"}
    for key, ax in axes.items():
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if "accuracy" in axes:
        axes["accuracy"].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    path = Path(output) if output else (Path(runs[0]) / "curves.png" if len(runs) == 1 else Path("curves.png"))
    if not output and len(runs) == 1:  # into the run directory: lcsm's file there, never the user's
        run_dir = Path(runs[0])
        if path.exists() and "curves.png" not in files.owned(run_dir):
            plt.close(fig)
            raise RecipeError(f"{path} was not written by lcsm; lcsm plot does not write over it: give -o FILE.png")
        try:
            files.claim(run_dir, "curves.png")
        except OSError:
            pass  # a read-only run: the write below says so
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png"))
    except OSError as e:
        raise RecipeError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)
    return path


def _labels(runs: list[str]) -> list[str]:
    """Run folder names, or longer paths where two names collide."""
    short = [Path(r).name or r for r in runs]
    return short if len(set(short)) == len(short) else [str(Path(r)) for r in runs]
