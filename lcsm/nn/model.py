"""The language model: embedding -> blocks (pre-norm, token mixer, channel mixer, residual) -> norm -> LM head.

`Model.forward(tokens, labels=None, cache=None, *, cu_seqlens=None)` is the one forward of lcsm:
training, evaluation, prefill and decoding, packed documents, sequence parallelism and the
benchmarks all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lcsm import parallel
from lcsm.config.spec import ModelSpec, load_model_spec
from lcsm.nn.channel import build_channel_mixer
from lcsm.nn.context import LayerContext
from lcsm.nn.generate import generate
from lcsm.nn.loss import linear_cross_entropy
from lcsm.nn.mixers import build_mixer
from lcsm.nn.norm import make_norm
from lcsm.nn.packing import Packing, using
from lcsm.nn.routing import balancing_loss

IGNORE = -100  # the label of positions without a loss (torch's ignore_index; lcsm.tasks writes it)
REDUCTIONS = ("mean", "sum")



# devices where the loss runs on the labelled rows only (selected on the host); elsewhere it runs on
# every row and ignores the unlabelled ones (Model.forward says why)
SELECT_LABELLED_ON = ("cpu",)

class Block(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: LayerContext):
        super().__init__()
        self.mixer_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.mixer = build_mixer(spec.layer_mixer(ctx.layer_idx), ctx)
        self.channel_mixer = None
        channel = build_channel_mixer(spec.channel_mixer, spec.d_model)
        if channel is not None:  # (the norm is registered first: checkpoints list it first)
            self.channel_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
            self.channel_mixer = channel

    def forward(self, x, cache=None, packing: Packing | None = None):
        # the packing is an argument (not only the context) so that activation checkpointing's
        # recomputation in the backward sees it too; the token mixer and its stages read current()
        with using(packing):
            x = x + self.mixer(_compute_dtype(self.mixer_norm(x)), cache=cache)
        if self.channel_mixer is not None:
            x = x + self.channel_mixer(_compute_dtype(self.channel_norm(x)))
        return x


def _compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """The normalised input of a mixer in the autocast dtype: every projection reading it then
    shares one copy (autocast would cast it, and keep the cast for the backward, once per matmul)."""
    if torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


@dataclass
class LayerSummary:
    index: int
    mixer: str
    parameters: int
    state_size: int  # numbers per sequence (EOS) or per token of context (attention)
    state_grows: bool
    flops_per_token: int
    active_parameters: int = 0  # used by each token: all but the experts (and head groups) it is not routed to


class Model(nn.Module):
    """A language model built from a ModelSpec (see forward)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        ctx = LayerContext(spec.d_model, spec.n_heads, 0, spec.n_layers, spec.norm_eps)
        self.blocks = nn.ModuleList(Block(spec, ctx.at(l)) for l in range(spec.n_layers))
        self.norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        for name, shared in ctx.shared.items():  # parameters several layers read (HGRN2's lower bounds)
            self.register_parameter(name, shared.make())
            shared.owner = self
        self.apply(self._init)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # activation checkpointing: every N-th block keeps only its input for the backward and is
        # recomputed there (0: none); set from a recipe's `checkpointing: {every: N}`
        self.checkpoint_every = 0
        self.blocks_compiled = False  # compile_blocks: every forward then starts a CUDA-graph step

    @classmethod
    def from_spec(cls, spec: str | Path | dict | ModelSpec) -> "Model":
        """Build from a YAML path, a zoo name, a dict or a ModelSpec (raises lcsm.config.base.SpecError)."""
        return cls(load_model_spec(spec))

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2 style small normal weights; biases keep what the stages set (e.g. Mamba's Δ bias),
        # and a stage marks a projection `_keep_init` where its starting weights matter
        if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: list[dict] | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        reduction: str = "mean",
        return_logits: bool = False,
    ):
        """tokens [B,T] (long).

        Without labels: the logits [B,T,vocab] (the last `logits_to_keep` positions only when it is
        > 0: a prefill needs the last one). With labels [B,T] (IGNORE = -100 where no loss is
        taken): the cross-entropy at the labelled positions, the head run only there and never as
        a full [n, vocab] tensor in the training path; reduction "mean" over the labelled tokens or
        "sum". return_logits=True also returns the logits at the labelled positions, [n, vocab]
        (at least fp32; evaluation: accuracy), computed directly.
        cache: one dict per layer (lcsm.nn.cache.new_cache) to decode: the layers start from the
        state found there and leave their new state.
        cu_seqlens [N+1] (int): packed documents. The boundaries of N documents in the tokens
        flattened row by row (tokens.reshape(-1)), from 0 to B·T; a row boundary is always one
        too. Every layer restarts at each boundary (lcsm/nn/packing.py): the outputs at a document
        equal those of the document run alone. Not with a cache or sequence parallelism.
        """
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache: one dict per layer ({len(self.blocks)}), got {len(cache)}")
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} must be the shape of tokens, {tuple(tokens.shape)}")
        packing, shape = None, tokens.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens: packed documents are for training and evaluation; decode one sequence per row with a cache")
            if parallel.current() is not None:
                raise ValueError("cu_seqlens: packed documents do not run under sequence parallelism; use parallel.sequence: 1")
            if tokens.dim() != 2:
                raise ValueError(f"cu_seqlens: tokens must be [B,T] (got shape {tuple(tokens.shape)})")
            packing = Packing.of(cu_seqlens, *shape, tokens.device)
            # one packed sequence [1, B·T]: the kernels take cu_seqlens with a batch of one
            tokens = tokens.reshape(1, -1)
            labels = None if labels is None else labels.reshape(1, -1)
        if self.blocks_compiled and not torch.compiler.is_compiling():
            # Under a CUDA-graph mode the graphs' outputs live in a pool that the next replay
            # overwrites; training marks a new step at each backward, but evaluation (no backward)
            # would read overwritten blocks' outputs ("accessing tensor output of CUDAGraphs that
            # has been overwritten", seen on the H200 at a run's first evaluation).
            # One mark per forward tells the pool that the last forward's outputs are done with.
            # Without CUDA graphs it only counts a step.
            torch.compiler.cudagraph_mark_step_begin()
        x = self.embed(tokens)
        every = self.checkpoint_every if (self.training and cache is None and torch.is_grad_enabled()) else 0
        for idx, (block, layer_cache) in enumerate(zip(self.blocks, cache or [None] * len(self.blocks))):
            if every and idx % every == 0:
                x = checkpoint(block, x, None, packing, use_reentrant=False)
            else:
                x = block(x, cache=layer_cache, packing=packing)
        h = self.norm(x)
        if labels is None:
            h = h.reshape(*shape, h.shape[-1])
            return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)} (got {reduction!r})")
        if not return_logits and (torch.compiler.is_compiling() or h.device.type not in SELECT_LABELLED_ON):
            # every position; the loss ignores the unlabelled ones (they add nothing to it or its
            # gradient). Selecting the labelled rows has a data-dependent size: under torch.compile
            # a graph break, on a GPU a wait in the middle of every step for the device to report
            # the count. On the CPU the selection costs no wait and saves the rows' work (MQAR
            # labels a quarter of its positions)
            hl, targets = h.flatten(0, 1), labels.flatten()
        else:
            mask = labels != IGNORE
            hl, targets = h[mask], labels[mask]
        if return_logits:
            logits = self.lm_head(hl)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction=reduction) if targets.numel() else logits.sum()
            return loss, logits
        loss = linear_cross_entropy(hl, self.lm_head.weight, targets, reduction=reduction)
        if parallel.current() is not None or parallel.distributed():
            # a rank without labelled tokens still takes part in every layer's collectives and
            # gradient reductions in the backward: keep all of h in the graph
            loss = loss + 0.0 * h.float().sum()
        return loss

    def compile_blocks(self, **options) -> "Model":
        """torch.compile every block in place (regional compilation: one compiled graph serves all
        blocks of the same structure, so compiling costs about one block's worth). The recurrence
        runs as one custom op inside (lcsm/kernels/ops.py). options: torch.compile's.

        What this process compiled before is dropped first: every model's blocks share
        Block.forward's code and dynamo's recompile limit counts per code object, so without the
        reset the ninth compiled model or shape of a process (an ablation worker, a benchmark)
        fails under fullgraph; an earlier model still alive recompiles on its next call."""
        torch._dynamo.reset()
        for block in self.blocks:
            block.compile(**{"fullgraph": True, **options})
        self.blocks_compiled = True
        return self

    def generate(self, prompt, max_new_tokens: int = 256, **sampling):
        """Sample a continuation of `prompt` (token ids): see lcsm.nn.generate.generate."""
        return generate(self, prompt, max_new_tokens, **sampling)

    def aux_loss(self) -> torch.Tensor | float:
        """The weighted balancing loss of the routed layers in the last forward (0.0 without any).

        The mechanism, for every routed part (Mixture-of-Memories mixers, MoE channel mixers): a
        module sets `self.routing_stats` (lcsm.nn.routing.RoutingStats: its router's statistics,
        weight and aggregation scope) and may set `self.aux_stats` (a dict of scalars for
        metrics.jsonl, e.g. the load of each memory) in its forward; this method combines the
        statistics (lcsm.nn.routing.balancing_loss). The trainer adds it to the objective.
        """
        stats = [m.routing_stats for m in self.modules() if getattr(m, "routing_stats", None) is not None]
        return balancing_loss(stats) if stats else 0.0

    def aux_stats(self) -> dict[str, float]:
        """Metrics of the routed modules from the last forward, keyed `<module path>.<name>`."""
        stats = {}
        for name, m in self.named_modules():
            found = getattr(m, "aux_stats", None)
            for key, value in (found if isinstance(found, dict) else {}).items():  # (Model's own is this method)
                stats[f"{name}.{key}"] = float(value)
        return stats

    def set_backend(self, backend: str) -> "Model":
        """Choose the recurrence backend of every EOS layer ("auto", "torch", "reference", ...)."""
        for block in self.blocks:
            if hasattr(block.mixer, "backend"):
                block.mixer.backend = backend
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters each token uses: all of them (embeddings included) less the routed parts it
        is not sent to, which a module reports through `inactive_parameters()` (the E - k experts
        of an MoE channel mixer; the unchosen head groups' read-out under head routing)."""
        return self.num_parameters() - sum(_inactive(m) for m in self.modules())

    def summary(self, context: int = 2048) -> list[LayerSummary]:
        """Per layer: parameters, recurrent state size and FLOPs per token (attention at `context`)."""
        rows = []
        for idx, block in enumerate(self.blocks):
            mixer = block.mixer
            matmul = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
            flops = 2 * matmul + mixer.flops_per_token(context)
            if hasattr(block.channel_mixer, "flops_per_token"):  # MoE: only the routed experts run
                flops += block.channel_mixer.flops_per_token() - 2 * block.channel_mixer.router.weight.numel()
            parameters = sum(p.numel() for p in block.parameters())
            rows.append(
                LayerSummary(
                    index=idx,
                    mixer=mixer.label,
                    parameters=parameters,
                    state_size=mixer.state_size(),
                    state_grows=mixer.state_grows,
                    flops_per_token=flops,
                    active_parameters=parameters - sum(_inactive(m) for m in block.modules()),
                )
            )
        return rows


def _inactive(module: nn.Module) -> int:
    count = getattr(module, "inactive_parameters", None)
    return count() if callable(count) and not isinstance(module, Model) else 0
