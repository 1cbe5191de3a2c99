"""lm-evaluation-harness on lcsm models: the `lcsm` model class and `lcsm eval RUN --lm-eval TASKS`.

    LcsmLM(model, tokenizer, ...)      an lm_eval.api.model.LM (registered as "lcsm": `lm_eval
                                       --model lcsm --model_args run=RUN,batch_size=8 --tasks ...`)
    run_lm_eval(run, tasks, ...)       simple_evaluate on a run; as_eval: its results in the eval schema

The three request kinds, on lcsm's recurrent cache (lcsm/nn/cache.py):
    loglikelihood          requests grouped by context: the context is prefilled once, its cache
                           copied to every continuation, and the continuations scored as one
                           right-padded batch (padding after a causal sequence changes nothing
                           before it); multiple choice costs one context pass, not one per choice
    loglikelihood_rolling  the whole text, in chunks of max_length tokens carried by the cache
                           (exact: a recurrent model has no window to roll)
    generate_until         greedy or sampled decoding from the cache, cut at the first stop string
                           (one request at a time: prompts of different lengths cannot share a
                           batch of recurrent states without padding inside them)

A document starts after the run's EOS separator (corpus runs) or, for a tokenizer without one, a
newline (text runs join their documents with blank lines): that token is the context of an empty
context. Tokenisation follows lm-eval's HF model: the context's trailing spaces move to the
continuation and the pair is encoded whole, so a token spanning the boundary goes to the continuation.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("lcsm eval --lm-eval needs lm-evaluation-harness: pip install 'lcsm[eval]'") from e

from lcsm.nn.cache import new_cache
from lcsm.nn.generate import sample
from lcsm.run.device import autocast


def _expand(cache, n: int):
    """A copy of a batch-of-one cache for n rows (tensors with a batch axis repeated; 0-d ones copied)."""
    if isinstance(cache, torch.Tensor):
        return cache.clone() if cache.dim() == 0 else cache.repeat(n, *[1] * (cache.dim() - 1))
    if isinstance(cache, dict):
        return {k: _expand(v, n) for k, v in cache.items()}
    if isinstance(cache, list):
        return [_expand(v, n) for v in cache]
    return cache


@register_model("lcsm")
class LcsmLM(LM):
    """model: an lcsm Model; tokenizer: the run's (encode/decode; eos_id if it has one);
    batch_size: continuations (or generations) scored together; max_length: tokens per forward
    pass of a long text (the cache carries the rest)."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 16, max_length: int = 2048,
                 precision: str = "fp32"):
        super().__init__()
        if tokenizer is None:
            raise ValueError("lm-eval needs a run with text (a text or corpus task): this run has no tokenizer")
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self.dev = torch.device(device)
        self.batch = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.precision = precision
        eos = getattr(tokenizer, "eos_id", None)
        self.prefix = [eos] if eos is not None else tokenizer.encode("\n")[-1:]
        self.eos = eos

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LcsmLM":
        """`lm_eval --model lcsm --model_args run=RUN[,batch_size=N,device=cpu,max_length=N]`."""
        from lm_eval.utils import simple_parse_args_string

        from lcsm.run.evaluate import load_run

        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        if "run" not in args:
            raise ValueError("--model_args run=RUN_DIRECTORY is required for the lcsm model")
        device = args.get("device") or "cpu"
        recipe, model, run_dir, _ = load_run(args["run"], torch.device(device))
        tok = recipe.task.load_tokenizer(run_dir)
        return cls(model, tok, device=device, batch_size=int(args.get("batch_size") or 16),
                   max_length=int(args.get("max_length") or 2048))

    # ------------------------------------------------------------------ helpers

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary changed the context's tokens
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        with autocast(self.dev, self.precision):
            return self.model(tokens.to(self.dev), cache=cache).float()

    @torch.no_grad()
    def _prefill(self, ids: list[int]):
        """(cache after ids, log-probabilities after the last id [vocab]); ids in pieces of max_length."""
        cache = new_cache(self.model)
        logits = None
        for a in range(0, len(ids), self.max_length):
            logits = self._forward(torch.tensor([ids[a : a + self.max_length]]), cache)[0, -1]
        return cache, F.log_softmax(logits, -1)

    # ------------------------------------------------------------------ the three request kinds

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for n, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(self.prefix + ctx), []).append(n)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for ctx, members in groups.items():
            cache, first = self._prefill(list(ctx))
            for a in range(0, len(members), self.batch):
                chunk = members[a : a + self.batch]
                conts = [pairs[n][1] for n in chunk]
                L = max(len(c) for c in conts)
                if L == 0:
                    for n in chunk:
                        out[n] = (0.0, True)
                    continue
                batch = torch.tensor([c + [c[-1] if c else 0] * (L - len(c)) for c in conts])  # right padding
                logp = F.log_softmax(self._forward(batch, _expand(cache, len(chunk))), -1)  # [b, L, vocab]
                # the first continuation token is predicted after the context, the others after their predecessor
                logp = torch.cat([first.expand(len(chunk), 1, -1), logp[:, :-1]], dim=1)
                for row, (n, c) in enumerate(zip(chunk, conts)):
                    target = torch.tensor(c, device=logp.device)
                    lp = logp[row, : len(c)]
                    score = lp.gather(-1, target[:, None])[:, 0].sum().item()
                    greedy = bool((lp.argmax(-1) == target).all())
                    out[n] = (score, greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self.prefix + self.tok.encode(r.args[0])
            cache = new_cache(self.model)
            total = 0.0
            for a in range(0, len(ids) - 1, self.max_length):
                piece = torch.tensor([ids[a : a + self.max_length + 1]])
                logp = F.log_softmax(self._forward(piece[:, :-1], cache), -1)
                total += logp.gather(-1, piece[:, 1:].to(logp.device)[..., None]).sum().item()
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            cache, logp = self._prefill(self.prefix + self.tok.encode(context))
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                nxt = int(sample(logp[None], temperature)[0])
                if self.eos is not None and nxt == self.eos:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(s in text for s in until):
                    break
                logp = F.log_softmax(self._forward(torch.tensor([[nxt]]), cache)[0, -1], -1)
            for s in until:  # cut at the first stop string, as lm-eval's models do
                if s and s in text:
                    text = text.split(s)[0]
            out.append(text)
        return out


# --------------------------------------------------------------------------- lcsm eval --lm-eval


class HarnessError(ValueError):
    """Bad lm-eval input (an unknown task, ...); str() is the message for the user."""


@functools.lru_cache(maxsize=8)
def task_manager(include: tuple[str, ...] = ()):
    """lm-eval's TaskManager for these folders of task YAMLs, made once per process: making one
    indexes lm-eval's thousands of built-in task files (about 12 s), and the index depends only
    on the folders. Sharing it changes no result: it builds fresh task objects on every load."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | None = None, include: list[str] | None = None,
                batch_size: int = 16, device: str | torch.device = "cpu", precision: str = "fp32", seed: int = 0) -> dict:
    """simple_evaluate of `tasks` (names, groups or glob patterns; `include`: folders of task YAMLs)
    on an lcsm model. Returns {"tasks", "limit", "results": {task: {metric: value}}, "versions",
    "n_samples"}. Raises HarnessError for a task it does not know."""
    from lm_eval import simple_evaluate

    manager = task_manager(tuple(include or ()))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        hint = f" (searched the built-in tasks and {', '.join(include)})" if include else " (a local task: --lm-eval-include DIR)"
        raise HarnessError(f"--lm-eval: unknown task(s) {', '.join(unknown)}{hint}; `lm_eval ls tasks` lists them")
    lm = LcsmLM(model, tokenizer, device=device, batch_size=batch_size, precision=precision)
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              bootstrap_iters=0)
    clean = {task: {k: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float)) and not
                    (isinstance(v, float) and math.isnan(v))} for task, metrics in results["results"].items()}
    return {"tasks": tasks, "limit": limit, "results": clean, "versions": {k: v for k, v in results.get("versions", {}).items()},
            "n_samples": results.get("n-samples", {})}


def as_eval(report: dict, include: list[str] | None = None) -> tuple[dict, dict]:
    """run_lm_eval's report as lcsm's eval schema (lcsm/run/evaluate.py's write_eval; `lcsm eval
    --lm-eval` writes it to RUN/eval/lm_eval.json, beside the training's eval.json): the task
    section {"kind": "lm_eval", "tasks", "limit", "include", "versions", "n_samples"} and the
    metrics {lm-eval task: {metric: value}}."""
    section = {"kind": "lm_eval", "tasks": list(report["tasks"]), "limit": report.get("limit"),
               "include": [str(p) for p in include] if include else None, "versions": report.get("versions", {}),
               "n_samples": report.get("n_samples", {})}
    return section, dict(report["results"])
