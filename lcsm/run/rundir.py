"""The run directory: what lcsm writes there, and how an existing one is continued or refused.

    RUN/config.yaml                 the resolved recipe (model inlined); `lcsm eval` rebuilds from it
    RUN/metrics.jsonl               one JSON object a line: {"split": "train" | "eval", "step", ...}
    RUN/checkpoint/model.safetensors  the weights (metadata: step; an init checkpoint, e.g. from
                                    lcsm upcycle, also says "init" and has no trainer.pt yet)
    RUN/checkpoint/trainer.pt       optimizer, scheduler, step, RNG states, data position
    RUN/checkpoint/dcp/             instead of those two in a sharded run (fsdp, hsdp): lcsm/run/dcp.py
    RUN/eval.json                   the final evaluation
    RUN/tokenizer.json              text tasks with a BPE tokenizer; corpus runs with a bpe or hf tokenizer
    RUN/corpus.json                 corpus runs: the corpus's manifest (its tokenizer, EOS, counts)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from lcsm.config.base import RecipeError
from lcsm.config.recipe import Recipe
from lcsm.run.checkpoint import checkpoint_step, init_weights, write_text

ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoint", "eval.json", "tokenizer.json", "corpus.json", "curves.png")
# recipe fields that may change between an interrupted run and its resumption (accumulate: the
# same step in more or fewer micro-batches, e.g. on fewer GPUs)
RESUMABLE_CHANGES = ("device", "backend", "log_every", "log", "eval_batch_size", "out_dir", "threads", "parallel", "compile",
                     "checkpointing", "accumulate")


def _has_run(run_dir: Path) -> bool:
    # a start that failed before its first step leaves at most config.yaml and tokenizer.json:
    # not a run worth protecting
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoint"))


def _clear(run_dir: Path) -> None:
    for name in ARTIFACTS:  # only lcsm's own files: out_dir may hold the user's too
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def init_only(run_dir: Path) -> Path | None:
    """The init checkpoint of a run directory that was never trained (lcsm upcycle's output), or None."""
    if (run_dir / "metrics.jsonl").exists():
        return None
    return init_weights(run_dir)


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool, init: bool = False) -> tuple[Path, bool]:
    """Create or check the run directory. Returns (run_dir, resuming).

    An existing run is never overwritten without overwrite=True; with resume=True it is continued
    from its checkpoint if it has one (and started afresh if it never reached one). A directory
    holding only an init checkpoint (never trained) is started from it, its files kept, with
    resume=True or init=True (--init-from); without either it is refused, so that its weights are
    not silently replaced by a fresh initialisation.
    """
    run_dir = recipe.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out_dir: {run_dir} exists and is not a directory")
    if not overwrite and init_only(run_dir) is not None:
        if resume or init:
            return run_dir, False
        raise RecipeError(
            f"{run_dir} holds init weights that were never trained (checkpoint/, e.g. from lcsm upcycle); pass "
            f"--init-from {run_dir} (or --resume auto) to start from them, or --overwrite to start from scratch"
        )
    if _has_run(run_dir):
        step = checkpoint_step(run_dir)
        if overwrite or (resume and step is None):
            _clear(run_dir)
        elif resume:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
            now = recipe.resolved()
            changed = [k for k in diff(saved or {}, now) if k.split(".")[0] not in RESUMABLE_CHANGES]
            if changed:
                raise RecipeError(
                    f"{run_dir}: the recipe differs from the run's config.yaml ({', '.join(changed[:6])}"
                    f"{', ...' if len(changed) > 6 else ''}); resume with the same recipe, or pass --overwrite to start over"
                )
            return run_dir, True
        else:
            at = f"at step {step}" if step is not None else "without a checkpoint"
            raise RecipeError(
                f"{run_dir} already holds a run ({at}); pass --resume auto to continue it or --overwrite to start over"
            )
    elif run_dir.is_dir():
        _clear(run_dir)  # leftovers of a failed start (a stale tokenizer must not be reused)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"out_dir: cannot create {run_dir} ({e.strerror})") from None
    return run_dir, False


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the checkpoint: the resumed run logs them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in keep))


