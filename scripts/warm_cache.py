#!/usr/bin/env python3
"""Generate the MQAR data of ablation points into the data cache ($LCSM_CACHE) before the grids run.

    python scripts/warm_cache.py [--reduced] [--jobs N] [--grid AXIS=VALUES ...] RECIPE [RECIPE ...]

Every MQAR setting of every point (each seed, train and test) is generated once, in parallel over
the settings. Without it, the workers of `lcsm ablate` that start at the same moment on points of
the same seed each generate the same data (a few seconds per 20,000 examples on one core) before
the first writes the cache; with it they all read the cache. A convenience for the GPU driver
(scripts/gpu_research.sh): the grids give the same results either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def _segments(recipes: list[str], reduced: bool, axes: list[str]) -> list[tuple[str, int, str, int]]:
    """Unique (task json, seed, split, setting index) over the MQAR points of the recipes."""
    from lcsm.run.ablate import prepare

    seen = {}
    for name in recipes:
        ab = prepare(name, "/tmp/warm-cache-unused", axes=[a for a in axes if a.split("=")[0] in _axes_of(name)], reduced=reduced)
        for p in ab.points:
            task = p.recipe["task"]
            if task.get("kind") != "mqar":
                continue
            text = json.dumps(task, sort_keys=True)
            for split in ("train", "test"):
                for index in range(len(task[split])):
                    seen[(text, p.seed, split, index)] = None
    return list(seen)


def _axes_of(name: str) -> list[str]:
    from lcsm.config.ablation import load_grid

    return list(load_grid(name)[0].grid)


def _make(item: tuple[str, int, str, int]) -> float:
    import torch

    from lcsm.config.recipe import load_recipe
    from lcsm.tasks.mqar import make_segment

    torch.set_num_threads(1)
    text, seed, split, index = item
    task = load_recipe({"model": "transformer", "task": json.loads(text), "steps": 1}).task
    t0 = time.perf_counter()
    make_segment(task, getattr(task, split)[index], seed, split, index)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--grid", action="append", default=[], metavar="AXIS=VALUES", help="as lcsm ablate --grid (applied to the recipes that have the axis)")
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args(argv)
    items = _segments(args.recipes, args.reduced, args.grid)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        spent = sum(pool.map(_make, items))
    print(f"warm_cache: {len(items)} MQAR segments in {time.perf_counter() - t0:.1f}s ({spent:.1f}s of generation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
