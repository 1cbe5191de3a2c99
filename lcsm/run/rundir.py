"""The run directory: what lcsm writes there, and how an existing one is continued or refused.

    RUN/config.yaml                 the resolved recipe (model inlined); `lcsm eval` rebuilds from it
    RUN/metrics.jsonl               one JSON object a line: {"split": "train" | "eval", "step", ...}
    RUN/checkpoint/step-NNNNNN/     the newest checkpoints (lcsm/run/checkpoint.py): model.safetensors,
                                    trainer.pt, manifest.json (sizes and SHA-256 of both)
    RUN/checkpoint/dcp/             instead, in a sharded run (fsdp, hsdp): the newest DCP checkpoint, and
                                    dcp.prev/ the one before (lcsm/run/dcp.py)
    RUN/checkpoint/init/            an init checkpoint (lcsm upcycle): model.safetensors and its manifest,
                                    no trainer state; a run starts from it with a fresh optimizer
    RUN/eval.json                   the final evaluation of the training run (lcsm/run/evaluate.py's schema)
    RUN/eval/<task>.json            `lcsm eval` reports, beside it (eval/lm_eval.json: `lcsm eval --lm-eval`)
    RUN/tokenizer.json              text tasks with a BPE tokenizer; corpus runs with a bpe or hf tokenizer
    RUN/corpus.json                 corpus runs: the corpus's manifest (its tokenizer, EOS, counts)
    RUN/tensorboard/, RUN/wandb/    the recipe's `log` sinks (lcsm/run/sinks.py)
    RUN/upcycle.json                lcsm upcycle's record (what was done, each layer's neuron partition)
    RUN/.lcsm-files.jsonl           the paths lcsm wrote here (lcsm/run/files.py)
    RUN/.lcsm.lock                  while a process uses the run (lcsm/run/lock.py)

The rules: an existing run is continued only with resume, replaced only with overwrite, and
overwrite removes only what lcsm wrote; a directory holding files lcsm did not write is not
started in without overwrite, and a file lcsm did not write is never written over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import yaml

from lcsm.config.base import RecipeError, SpecError, read_utf8
from lcsm.config.recipe import Recipe
from lcsm.run import files, lock
from lcsm.run.checkpoint import init_checkpoint, init_weights, list_checkpoints, remove_checkpoint_files, write_text
from lcsm.run.dcp import newest_step, sharded_step

ARTIFACTS = files.NAMES
# recipe fields that may change between an interrupted run and its resumption: they change
# nothing the run computes (dotted keys name one field of a section; accumulate: the same step
# in more or fewer micro-batches, e.g. on fewer GPUs)
RESUMABLE_CHANGES = ("device", "backend", "log_every", "log", "eval_batch_size", "out_dir", "threads", "parallel", "compile",
                     "checkpointing", "keep_checkpoints", "accumulate")
# what `lcsm train --resume auto` may change too: the knobs that rescue a run whose loss became
# non-finite (the message then says to resume with a lower optimizer.lr)
RETUNABLE = ("optimizer.lr", "optimizer.grad_clip", "schedule.warmup_steps")
# what a fresh run claims before it writes anything (tokenizer.json: BPE runs only)
# (tensorboard/ and wandb/ are claimed by lcsm/run/sinks.py when a sink creates them)
FRESH = ("config.yaml", "metrics.jsonl", "eval.json", "tokenizer.json", "corpus.json", "checkpoint")


def diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _covered(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def read_config(run_dir: Path) -> dict | None:
    """RUN/config.yaml as data (None when absent). Raises SpecError naming the file when it is
    not UTF-8 or not YAML."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    return data if isinstance(data, dict) else None


def open_run_dir(recipe: Recipe, resume: bool, overwrite: bool, *, retune: bool = False, init: bool = False,
                 log: Callable[[str], None] | None = None) -> tuple[Path, bool, lock.Lock]:
    """Create the run directory if needed, lock it (lcsm/run/lock.py) and prepare it
    (prepare_run_dir). Returns (run_dir, resuming, the lock: release it when done)."""
    run_dir = recipe.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out_dir: {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"out_dir: cannot create {run_dir} ({e.strerror})") from None
    held = lock.acquire(run_dir, "run directory", log)
    try:
        resuming = prepare_run_dir(recipe, resume, overwrite, retune=retune, init=init, log=log)[1]
    except BaseException:
        held.release()
        raise
    return run_dir, resuming, held


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool, *, retune: bool = False, init: bool = False,
                    log: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """Check an existing run directory (the caller holds its lock) and say how to go on.
    Returns (run_dir, resuming: a checkpoint is there to resume from).

    - A name lcsm writes (config.yaml, eval.json, ...) held by a file lcsm did not write: refused,
      even with overwrite (lcsm never writes over it).
    - overwrite: lcsm's files are removed (only those), and the run starts afresh.
    - A run (checkpoints, metrics, an evaluation): continued with resume if the recipe matches
      config.yaml but for RESUMABLE_CHANGES (and RETUNABLE with retune); else refused.
    - An init checkpoint (checkpoint/init/, lcsm upcycle's) and no run yet: started in, its files
      kept, with resume or init (--init-from; the trainer loads the weights); refused without either,
      so that the weights are not silently replaced by a fresh initialisation.
    - Files lcsm did not write (and no run): refused without overwrite.
    """
    say = log or (lambda msg: None)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    mine = {p.split("/")[0] for p in files.owned(run_dir)}
    present = files.entries(run_dir)
    foreign = [n for n in present if n not in mine]
    clash = [n for n in foreign if n in files.NAMES]
    if clash:
        it = "it" if len(clash) == 1 else "them"
        raise RecipeError(
            f"{run_dir}: {', '.join(clash)} {'was' if len(clash) == 1 else 'were'} not written by lcsm (not listed in "
            f"{files.MANIFEST}); lcsm neither removes nor overwrites files it did not write: move {it} away, or choose another out_dir"
        )
    found = list_checkpoints(run_dir) if "checkpoint" in mine else []
    sharded = sharded_step(run_dir) if "checkpoint" in mine else None  # a sharded run's (fsdp, hsdp)
    has_init = "checkpoint" in mine and init_checkpoint(run_dir) is not None
    results = [n for n in ("metrics.jsonl", "eval.json", "eval") if n in mine and (run_dir / n).exists()]
    if overwrite:
        kept = remove_owned(run_dir)
        if kept:
            say(f"--overwrite: kept {', '.join(kept)} in {run_dir}: they hold files lcsm did not write")
        files.claim(run_dir, *FRESH)
        return run_dir, False
    if found or sharded is not None or results:
        if not resume:
            if sharded is not None or found:
                step = newest_step(run_dir)
                at = f"at step {step}" if step is not None else f"with a checkpoint in {found[0].folder}"
            else:
                at = "with " + " and ".join(results) + ", no checkpoint yet"
            raise RecipeError(f"{run_dir} already holds a run ({at}); pass --resume auto to continue it or --overwrite to start over")
        saved = read_config(run_dir)
        allowed = RESUMABLE_CHANGES + (RETUNABLE if retune else ())
        changed = [k for k in diff(saved or {}, recipe.resolved()) if not _covered(k, allowed)]
        if changed:
            hint = "" if retune else f" ({', '.join(RETUNABLE)} may change with lcsm train --resume auto)"
            raise RecipeError(
                f"{run_dir}: the recipe differs from the run's config.yaml ({', '.join(changed[:6])}"
                f"{', ...' if len(changed) > 6 else ''}); resume with the same recipe{hint}, or pass --overwrite to start over"
            )
        files.claim(run_dir, *sorted(files.owned(run_dir)), *FRESH)  # a run of the layout before the manifest: adopted
        if found or sharded is not None:
            return run_dir, True
        if any(n in results for n in ("eval.json", "eval")):
            raise RecipeError(f"{run_dir} holds an evaluation ({', '.join(r for r in results if r != 'metrics.jsonl')}) but no "
                              "checkpoint to resume from; pass --overwrite to start over")
        # metrics of a start that stopped before its first checkpoint: it starts again from step 0
        # (from the init checkpoint when there is one: the trainer loads it; verified here first,
        # so that an unreadable one stops the resume before metrics.jsonl is touched)
        if has_init and not init:
            init_weights(run_dir)
        say(f"{run_dir}: no checkpoint yet, so the run starts again from step 0"
            + (" from its init checkpoint" if has_init else "") + " (its metrics.jsonl is rewritten)")
        truncate_metrics(run_dir / "metrics.jsonl", 0, log)
        return run_dir, False
    if has_init:
        if not (resume or init):
            raise RecipeError(
                f"{run_dir} holds init weights that were never trained (checkpoint/init/, e.g. from lcsm upcycle); pass "
                f"--init-from {run_dir} (or --resume auto) to start from them, or --overwrite to start from scratch"
            )
        files.claim(run_dir, *sorted(files.owned(run_dir)), *FRESH)  # (an upcycle of the layout before the manifest: adopted)
        return run_dir, False
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RecipeError(
            f"out_dir: {run_dir} holds files lcsm did not write ({shown}); choose another out_dir, or pass --overwrite "
            "to start the run beside them (lcsm removes and overwrites only files it wrote)"
        )
    # lcsm's own leftovers of a start that never trained (config.yaml, a tokenizer.json that must
    # not be reused): replaced
    remove_owned(run_dir)
    files.claim(run_dir, *FRESH)
    return run_dir, False


def remove_owned(run_dir: Path) -> list[str]:
    """Remove every path lcsm claimed in run_dir that exists (deepest first; a checkpoint folder by
    its manifest; any folder only once empty); then the manifest. Returns lcsm's folders left in
    place because they hold files lcsm did not write."""
    mine = files.owned(run_dir)
    kept = []
    for rel in sorted(mine, key=lambda p: (-p.count("/"), p)):
        target = run_dir / rel
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            if rel in files.TREES:  # a metric sink's folder: every file in it was written for lcsm
                shutil.rmtree(target, ignore_errors=True)
                continue
            remove_checkpoint_files(target)
            if target.exists():
                try:
                    target.rmdir()
                except OSError:
                    kept.append(rel)  # it holds something lcsm did not write: left as it is
    (run_dir / files.MANIFEST).unlink(missing_ok=True)
    return kept


def record_retune(run_dir: Path, recipe: Recipe, log: Callable[[str], None] | None = None) -> list[str]:
    """After a resume that changed RETUNABLE fields: config.yaml takes their new values (it holds
    the recipe the run goes on with; metrics.jsonl logs the lr of every step). Returns the keys."""
    saved = read_config(run_dir)
    if saved is None:
        return []
    now = recipe.resolved()
    changed = [k for k in diff(saved, now) if _covered(k, RETUNABLE)]
    if not changed:
        return []
    for key in changed:
        section, field = key.split(".", 1)
        old = (saved.get(section) or {}).get(field)
        saved.setdefault(section, {})[field] = now[section][field]
        if log is not None:
            log(f"resuming with {key} = {now[section][field]} (was {old}); config.yaml updated")
    write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(saved, sort_keys=False, allow_unicode=True))
    return changed


def truncate_metrics(path: Path, step: int, log: Callable[[str], None] | None = None) -> None:
    """Drop the lines logged after the checkpoint: the resumed run logs them again. A last line cut
    short (the process was killed while writing it) is dropped with a note; a damaged line before
    it is an error and the file is left as it is."""
    if not path.exists():
        return
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    keep = []
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if n == last:
                if log is not None:
                    log(f"{path}: dropped its last line, cut short when the run stopped (line {n + 1}: {line[:40]!r})")
                continue
            raise SpecError(f"{path}:{n + 1}: not a JSON line, the file is damaged; nothing was changed. Repair or remove "
                            "that line, or pass --overwrite to start over") from None
        step_of = record.get("step", 0)
        if not isinstance(step_of, (int, float)) or step_of <= step:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))
