"""Which files in a run directory lcsm wrote: the manifest RUN/.lcsm-files.jsonl.

Every writer of a run directory (the trainer, checkpoints, `lcsm eval`, `lcsm plot`, `lcsm ablate`)
claims a path here *before* it writes it, one JSON line per path ({"path": "checkpoint/step-000012"}),
appended with O_APPEND so that two writers never lose each other's lines. The manifest is what
lets lcsm tell its own files from the user's:

  - `--overwrite` removes only claimed paths (and a folder only once it is empty);
  - a fresh start refuses a directory holding anything unclaimed, and never writes over an
    unclaimed file with one of lcsm's names (config.yaml, eval.json, ...).

A run written before the manifest existed (checkpoint/model.safetensors + trainer.pt side by
side, no manifest) is recognised by its layout: its files with lcsm's names count as lcsm's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = ".lcsm-files.jsonl"
LOCK = ".lcsm.lock"
# lcsm's own bookkeeping: never the user's, never reported as a leftover
BOOKKEEPING = (MANIFEST, LOCK, LOCK + ".break")
# every top-level name lcsm writes into a run directory (eval/ holds `lcsm eval` reports; corpus.json
# corpus runs; tensorboard/ and wandb/ the metric sinks; upcycle.json lcsm upcycle's record)
NAMES = ("config.yaml", "metrics.jsonl", "checkpoint", "eval.json", "eval", "tokenizer.json", "corpus.json", "curves.png",
         "point.json", "tensorboard", "wandb", "upcycle.json")
# folders a metric sink (TensorBoard, wandb) fills on lcsm's behalf, with file names lcsm does not
# choose: claimed whole when the sink creates them, and removed whole by --overwrite
TREES = ("tensorboard", "wandb")
# what the code before the manifest wrote: the flat checkpoint and `lcsm eval`'s eval-TASK.json
LEGACY_CHECKPOINT = ("checkpoint/model.safetensors", "checkpoint/trainer.pt")


def claim(run_dir: Path, *paths: str) -> None:
    """Record paths (relative to run_dir, '/'-separated) as written by lcsm, before writing them.
    The first claim in a run of the layout before the manifest adopts that run's files first."""
    have = owned(run_dir, legacy=False)
    adopt = sorted(_legacy(run_dir)) if not (run_dir / MANIFEST).exists() else []
    new = list(dict.fromkeys(p for p in [*adopt, *paths] if p not in have))
    if not new:
        return
    lines = "".join(json.dumps({"path": p}) + "\n" for p in new)
    fd = os.open(run_dir / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def owned(run_dir: Path, legacy: bool = True) -> set[str]:
    """The paths lcsm claimed in run_dir (whether or not they exist now). Without a manifest,
    legacy=True recognises a run of the previous layout (see the module docstring)."""
    try:
        text = (run_dir / MANIFEST).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return _legacy(run_dir) if legacy else set()
    out = set()
    for line in text.splitlines():
        try:
            out.add(str(json.loads(line)["path"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: the claim it held was never acted on
    return out


def _legacy(run_dir: Path) -> set[str]:
    """A run the code before the manifest wrote: it has metrics.jsonl or a flat checkpoint, and
    config.yaml. Its files with lcsm's names are lcsm's; anything else is the user's."""
    flat = any((run_dir / p).is_file() for p in LEGACY_CHECKPOINT)
    if not (run_dir / "config.yaml").is_file() or not (flat or (run_dir / "metrics.jsonl").is_file()):
        return set()
    out = {n for n in NAMES if (run_dir / n).exists() and n not in ("checkpoint", "eval")}
    out |= {p for p in LEGACY_CHECKPOINT if (run_dir / p).exists()}
    if (run_dir / "checkpoint").is_dir():
        out.add("checkpoint")
    out |= {p.name for p in run_dir.glob("eval-*.json")}
    return out


def entries(run_dir: Path) -> list[str]:
    """The top-level names in run_dir, lcsm's bookkeeping files left out."""
    try:
        return sorted(p.name for p in run_dir.iterdir() if p.name not in BOOKKEEPING)
    except OSError:
        return []
