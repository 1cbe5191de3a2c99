"""Evaluation: loss and accuracy at the labelled positions, per slice; perplexity and bits per byte for text.

`lcsm eval` and the trainer's periodic evaluation both run `evaluate`, on Model.forward with labels. Accuracy follows Zoology:
per example, the fraction of labelled positions whose argmax is the label; then the mean over
examples (and over the examples of each slice).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model

from lcsm.config.base import RecipeError
from lcsm.config.recipe import load_recipe
from lcsm.nn.model import Model
from lcsm.nn.packing import cu_seqlens_of
from lcsm.run import dcp
from lcsm.run.checkpoint import find_weights, weights_run_dir, write_text
from lcsm.run.device import autocast
from lcsm.tasks import IGNORE, Segment, TaskData


@torch.no_grad()
def evaluate_segment(model, seg: Segment, batch_size: int, device: torch.device, precision: str, bytes_per_token=None) -> dict:
    """Sums over one segment: nats, labelled tokens, correct tokens, per-example accuracy, bytes."""
    nats = tokens = correct = bytes_ = 0.0
    acc_sum, examples = 0.0, 0
    for start in range(0, len(seg), batch_size):
        x = seg.inputs[start : start + batch_size].to(device)
        y = seg.labels[start : start + batch_size].to(device)
        mask = y != IGNORE
        targets = y[mask]
        packed = {}
        if seg.starts is not None:  # packed documents: the model restarts at each (as in training)
            packed["cu_seqlens"] = cu_seqlens_of(seg.starts[start : start + batch_size].to(device))
        with autocast(device, precision):
            loss, logits = model(x, y, reduction="sum", return_logits=True, **packed)
        nats += float(loss)
        hit = logits.argmax(-1) == targets
        tokens += targets.numel()
        correct += hit.sum().item()
        # per-example accuracy: scatter the hits back to their rows
        per_row = torch.zeros(mask.shape, device=device)
        per_row[mask] = hit.float()
        counts = mask.sum(1)
        has = counts > 0
        acc_sum += (per_row.sum(1)[has] / counts[has]).sum().item()
        examples += int(has.sum())
        if bytes_per_token is not None:
            bytes_ += bytes_per_token.to(device)[targets].sum().item()
    return {"nats": nats, "tokens": tokens, "correct": correct, "acc_sum": acc_sum, "examples": examples, "bytes": bytes_}


def _summary(s: dict, text: bool) -> dict:
    loss = s["nats"] / max(s["tokens"], 1)
    out = {
        "loss": loss,
        "accuracy": s["acc_sum"] / max(s["examples"], 1),
        "token_accuracy": s["correct"] / max(s["tokens"], 1),
        "examples": int(s["examples"]),
        "tokens": int(s["tokens"]),
    }
    if text:
        out["perplexity"] = math.exp(min(loss, 700.0))
        out["bits_per_byte"] = s["nats"] / math.log(2) / max(s["bytes"], 1)
    return out


def evaluate(model, data: TaskData, batch_size: int, device: torch.device, precision: str = "fp32") -> dict:
    """Metrics over the test segments: overall and one entry per slice.

    Returns {"loss", "accuracy", "token_accuracy", "examples", "tokens", ["perplexity",
    "bits_per_byte"], "slices": {name: {...same, plus the slice's settings}}}.
    """
    was_training = model.training
    model.eval()
    text = data.bytes_per_token is not None
    total = dict.fromkeys(("nats", "tokens", "correct", "acc_sum", "examples", "bytes"), 0.0)
    slices = {}
    try:
        for seg in data.test:
            s = evaluate_segment(model, seg, batch_size, device, precision, data.bytes_per_token)
            for k in total:
                total[k] += s[k]
            prev = slices.get(seg.name)
            if prev is not None:  # the same setting listed twice: pool it
                s = {k: prev["_sums"][k] + s[k] for k in s}
            slices[seg.name] = {**seg.slice, **_summary(s, text), "_sums": s}
    finally:
        model.train(was_training)
    result = _summary(total, text)
    result["slices"] = {name: {k: v for k, v in row.items() if k != "_sums"} for name, row in slices.items()}
    return result


# --------------------------------------------------------------------------- the eval schema

EVAL_FORMAT = "lcsm-eval/1"


@dataclass
class EvalRecord:
    """One evaluation as stored in RUN/eval.json (lcsm train, lcsm ablate) or RUN/eval/<task>.json
    (lcsm eval): the step of the weights, the task section it ran on (None in files of the
    flat layout, which did not record it), the metrics `evaluate` returns, and who wrote it."""

    step: int | None
    metrics: dict
    task: dict | None = None
    written_by: str | None = None


def write_eval(path: Path, step: int, metrics: dict, task: dict | None, written_by: str, run: str | None = None) -> None:
    """Write one evaluation in the one schema every reader takes (read_eval):
    {"format": "lcsm-eval/1", "written_by", ["run",] "step", "task", "metrics"}; atomically."""
    record = {"format": EVAL_FORMAT, "written_by": written_by, **({"run": run} if run else {}), "step": step, "task": task,
              "metrics": metrics}
    write_text(Path(path), json.dumps(record, indent=2) + "\n")


def parse_eval(data) -> EvalRecord | None:
    """An EvalRecord from the parsed JSON of any layout lcsm has written, or None when it is none:
    the schema (format lcsm-eval/1), the `{run, step, task, metrics}` of the old `lcsm eval`, and
    the flat metrics with their step of the old `lcsm train`."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("metrics"), dict):  # the schema, or the old lcsm eval's report
        step = data.get("step")
        return EvalRecord(step if isinstance(step, int) else None, data["metrics"],
                          data.get("task") if isinstance(data.get("task"), dict) else None,
                          data.get("written_by") or ("lcsm eval" if "run" in data else None))
    if "loss" in data:  # flat: the metrics themselves, and the step
        step = data.get("step")
        return EvalRecord(step if isinstance(step, int) else None, {k: v for k, v in data.items() if k != "step"},
                          None, "lcsm train")
    return None


def read_eval(path: Path) -> EvalRecord | None:
    """The evaluation in a file of any layout lcsm has written (parse_eval); None when the file is
    missing, unreadable or not an evaluation. The one reader of eval files."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return parse_eval(data)


# --------------------------------------------------------------------------- lcsm eval


def load_run(path: str | Path, device: torch.device | None = None, log: Callable[[str], None] | None = None):
    """(recipe, model, run_dir, step) from a run directory, its checkpoint/ folder, one step-N/ (or
    init/) folder of it or a model.safetensors file (lcsm/run/checkpoint.py's find_weights: a run's
    newest checkpoint that verifies, else its init checkpoint; a newer unreadable one is reported
    through log); a sharded run's checkpoint (lcsm/run/dcp.py) is read whole."""
    sharded = dcp.find(Path(path))  # a sharded run (fsdp, hsdp): its DCP checkpoint, read whole in this process
    if sharded is not None:
        run_dir, folder = sharded
        recipe = load_recipe(run_dir / "config.yaml")
        model = Model(recipe.model)
        # the folder itself when the user named it; from the run (or checkpoint/) folder, the newest
        # that can be read
        step = dcp.load_weights(folder if Path(path) == folder else run_dir, model, log)
        model.set_backend(recipe.backend)
        return recipe, model.to(device or "cpu"), run_dir, step
    weights, step = find_weights(path, log)
    run_dir = weights_run_dir(weights)
    if run_dir is None:
        raise RecipeError(f"{weights}: no config.yaml beside it or in the folders above; is this an lcsm run?")
    recipe = load_recipe(run_dir / "config.yaml")
    model = Model(recipe.model)
    try:
        load_model(model, str(weights), device="cpu")
    except Exception as e:  # a truncated file or another model's weights
        raise RecipeError(f"{weights}: cannot load the weights into the model of config.yaml ({str(e).splitlines()[0]})") from None
    model.set_backend(recipe.backend)
    return recipe, model.to(device or "cpu"), run_dir, step
