"""The EOS spec language: pydantic models of a model spec and its loading.

A spec is YAML (or a dict) that declares a language model whose token mixers are either EOS
recurrences (input, expand, oscillation and shrink stages) or causal softmax attention. Everything
here is validation and naming; no tensors are made. See docs/spec.md for every field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from lcsm.config.base import Base, FieldError, SpecError, format_errors, load_yaml, set_only_with
from lcsm.config.paths import resolve_spec_path

FeatureMap = Literal[
    "identity", "relu", "sigmoid", "elu_plus_one", "silu", "elu", "relu_squared", "square"
]
Parametrization = Literal["sigmoid_tau", "exp_softplus", "lower_bound"]
Slopes = Literal["alibi", "tnl", "retnet"]

# --------------------------------------------------------------------------- stages


class InputStage(Base):
    """The input i_t (the 'value'): a projection d_model -> H*V."""

    feature_map: FeatureMap = "identity"
    conv: int | None = Field(None, ge=2, le=64, description="short causal depthwise convolution size")
    scale_by: Literal["none", "dt"] = Field(
        "none", description="'dt' multiplies the input by the oscillation's Δ (Mamba's Δ-scaled input)"
    )


class KeyStage(Base):
    """Expand (key) or shrink (query): a vector of size K per head and token."""

    source: Literal["data", "param", "fixed"] | None = Field(
        None, description="data: projection of x; param: learned [H,K]; fixed: all ones (default data)"
    )
    feature_map: FeatureMap = "identity"
    conv: int | None = Field(None, ge=2, le=64)
    scale: Literal["none", "rsqrt_k"] | float = Field(
        "none", description="multiply by a constant; rsqrt_k = K^-1/2 as in GLA"
    )
    tie: Literal["none", "one_minus_oscillation"] = Field(
        "none", description="expand only: e = 1 - o (HGRN2); the stage then has no source of its own"
    )
    norm: Literal["none", "l2"] = Field(
        "none", description="l2: each head's vector divided by its L2 norm, after the feature map and before the "
        "scale (the delta rule's keys and queries)",
    )

    @field_validator("feature_map", "conv", "norm")
    @classmethod
    def _needs_a_tensor(cls, v, info: ValidationInfo):
        if info.data.get("source") == "fixed" and v not in (None, "identity"):
            raise ValueError("has no effect with source: fixed (the stage is all ones)")
        return v

    @field_validator("tie")
    @classmethod
    def _tie_replaces_source(cls, v, info: ValidationInfo):
        if v != "none":
            for field in ("source", "feature_map", "conv", "scale", "norm"):
                if field in info.data and info.data[field] not in (None, "identity", "none"):
                    raise ValueError(f"tie '{v}' replaces the stage's projection; remove '{field}'")
        return v

    @property
    def resolved_source(self) -> str:
        return self.source or "data"


# --------------------------------------------------------------------------- oscillations


class OscillationKind(Base):
    """What every oscillation kind tells the rest of the spec (class attributes, not fields)."""

    routable: ClassVar[bool] = False  # separable: Mixture-of-Memories can route it
    decay_along_k: ClassVar[bool] = False  # a decay along K (or per head) for the tie e = 1 - o
    delta_along: ClassVar[bool] = False  # exp_softplus gives a Δ along heads or V for input.scale_by: dt
    rotates: ClassVar[bool] = False  # a rotation of expand and shrink (K/2 projected features)
    transition: ClassVar[bool] = False  # a K×K delta transition whose removal key is the expand key

    def describe(self) -> str:
        """One short line for tables (lcsm show, lcsm zoo)."""
        parts = [self.kind]
        source = getattr(self, "source", None)
        if source is not None:
            parts.append(source)
            if source == "fixed":
                parts.append(f"{self.slopes} slopes")
            else:
                parts.append(self.parametrization + (f" τ={self.tau:g}" if self.parametrization == "sigmoid_tau" else ""))
        return " ".join(parts)


class _Gated(OscillationKind):
    """Fields shared by the oscillations whose decay is a gate (scalar, vector_k, vector_v, outer, full)."""

    source: Literal["data", "param", "fixed"] = "data"
    parametrization: Parametrization = "sigmoid_tau"
    tau: float = Field(16.0, gt=0, description="sigmoid_tau: o = sigmoid(z)^(1/tau)")
    lower_bound: float | Literal["layerwise"] = Field(
        0.0, description="lower_bound: o = b + (1-b) sigmoid(z); 'layerwise' learns b per layer as HGRN2"
    )
    slopes: Slopes = Field("alibi", description="fixed: the hand-crafted decay per head")
    rank: int | None = Field(None, ge=1, description="data: low-rank projection d_model -> rank -> gate")

    @field_validator("parametrization")
    @classmethod
    def _param_needs_learned(cls, v, info: ValidationInfo):
        if info.data.get("source") == "fixed":
            raise ValueError("not used with source: fixed (the slopes set the decay); use source: data or param")
        return v

    @field_validator("tau")
    @classmethod
    def _tau(cls, v, info: ValidationInfo):
        set_only_with(info, "parametrization", ("sigmoid_tau",), "tau")
        if info.data.get("source") == "fixed":
            raise ValueError("not used with source: fixed")
        return v

    @field_validator("lower_bound")
    @classmethod
    def _lower_bound(cls, v, info: ValidationInfo):
        if info.data.get("parametrization") != "lower_bound":
            raise ValueError("only applies with parametrization: lower_bound")
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1) or 'layerwise' (got {v})")
        return v

    @field_validator("slopes")
    @classmethod
    def _slopes(cls, v, info: ValidationInfo):
        set_only_with(info, "source", ("fixed",), "slopes")
        return v

    @field_validator("rank")
    @classmethod
    def _rank(cls, v, info: ValidationInfo):
        set_only_with(info, "source", ("data",), "rank")
        return v


class OnesOscillation(OscillationKind):
    """o = 1: no decay (linear attention)."""

    kind: Literal["ones"]
    routable: ClassVar[bool] = True


class ScalarOscillation(_Gated):
    """One decay per head: fixed slopes (TNL, RetNet), learned (per head) or per token (Mamba2)."""

    kind: Literal["scalar"]
    routable: ClassVar[bool] = True
    decay_along_k: ClassVar[bool] = True
    delta_along: ClassVar[bool] = True


class VectorKOscillation(_Gated):
    """A decay along K broadcast over V (GLA, HGRN2)."""

    kind: Literal["vector_k"]
    source: Literal["data", "param"] = "data"
    routable: ClassVar[bool] = True
    decay_along_k: ClassVar[bool] = True


class VectorVOscillation(_Gated):
    """A decay along V broadcast over K."""

    kind: Literal["vector_v"]
    source: Literal["data", "param"] = "data"
    routable: ClassVar[bool] = True
    delta_along: ClassVar[bool] = True


class OuterOscillation(_Gated):
    """o = o_k ⊗ o_v, separable in log space (the LCSM default)."""

    kind: Literal["outer"]
    source: Literal["data", "param"] = "data"
    routable: ClassVar[bool] = True


class FullOscillation(_Gated):
    """Any K×V decay. exp_softplus: log o = Δ ⊗ A (Mamba's S6 with data, S4D with param);
    sigmoid_tau: log o = logσ(z ⊙ P)/τ with z from data along V (or logσ(P)/τ with param)."""

    kind: Literal["full"]
    source: Literal["data", "param"] = "data"
    parametrization: Literal["exp_softplus", "sigmoid_tau"] = "exp_softplus"
    delta_along: ClassVar[bool] = True


class RotationOscillation(OscillationKind):
    """o = e^{iθ}, run as a feature map on expand and shrink: [x cos tθ, x sin tθ] (cosFormer, LRPE).

    K is the state size; the expand and shrink projections produce K/2 features each."""

    kind: Literal["rotation"]
    theta: Literal["rope", "uniform", "learned"] = Field(
        "rope", description="rope: θ_j = base^(-2j/K); uniform: θ = π/(2·max_len) (cosFormer); learned"
    )
    base: float = Field(10000.0, gt=1.0)
    max_len: int = Field(2048, ge=1, description="uniform: the cosFormer length M")
    rotates: ClassVar[bool] = True

    def describe(self) -> str:
        return f"rotation θ {self.theta}"


class CumSoftmaxOscillation(OscillationKind):
    """o_t = exp(LSE_{t-1} - LSE_t) with e scaled by 1 - o_t: a running softmax over tokens."""

    kind: Literal["cumsoftmax"]
    along: Literal["head", "k"] = Field("k", description="one score per head, or one per key feature")
    rank: int | None = Field(None, ge=1)

    def describe(self) -> str:
        return f"cumsoftmax along {self.along}"


class Beta(Base):
    """The delta rule's write strength β_t per head: the transition is I − β k̂ k̂ᵀ."""

    source: Literal["data", "param", "fixed"] = Field("data", description="data: a projection of x; param: "
                                                      "learned per head; fixed: `value` everywhere")
    map: Literal["sigmoid", "sigmoid2"] = Field(
        "sigmoid", description="sigmoid: β ∈ (0, 1); sigmoid2: 2σ ∈ (0, 2), negative eigenvalues allowed")
    value: float = Field(1.0, gt=0, le=2, description="fixed: the constant β")

    @field_validator("value")
    @classmethod
    def _value(cls, v, info: ValidationInfo):
        set_only_with(info, "source", ("fixed",), "value")
        return v


DeltaDecay = Annotated[Union["OnesOscillation", "ScalarOscillation", "VectorKOscillation"], Field(discriminator="kind")]


class DeltaOscillation(OscillationKind):
    """The delta rule: a K×K transition m_t = (I − w_t e_tᵀ)(D_t ⊙ m_{t−1}) + e_t i_tᵀ with the
    removal key w_t the (L2-normalised) expand key k̂_t, e_t = β_t k̂_t, and D_t the element-wise decay
    of `decay` (ones: DeltaNet; scalar: Gated DeltaNet; vector_k: Kimi Delta Attention)."""

    kind: Literal["delta"]
    decay: DeltaDecay = Field(default_factory=lambda: OnesOscillation(kind="ones"),
                              description="the element-wise part: ones, scalar or vector_k (any of their sources)")
    beta: Beta = Field(default_factory=Beta)
    routable: ClassVar[bool] = True
    transition: ClassVar[bool] = True

    def describe(self) -> str:
        beta = f"β {self.beta.source}" + (f" {self.beta.map}" if self.beta.source != "fixed" else f" = {self.beta.value:g}")
        return f"delta, decay {self.decay.describe()}, {beta}"


class MatrixOscillation(Base):
    """Other K×K matrix oscillations: rejected, there is no kernel for them."""

    kind: Literal["matrix"]

    @model_validator(mode="before")
    @classmethod
    def _not_supported(cls, data):
        raise ValueError(
            "general K×K matrix oscillations are not supported: the kernel runs element-wise decays and the "
            "delta rule (kind: delta, a rank-one transition I − β k̂ k̂ᵀ); use one of ones, scalar, vector_k, "
            "vector_v, outer, full, rotation, cumsoftmax, delta"
        )


OSCILLATION_KINDS = (
    OnesOscillation, ScalarOscillation, VectorKOscillation, VectorVOscillation, OuterOscillation,
    FullOscillation, RotationOscillation, CumSoftmaxOscillation, DeltaOscillation,
)


def kinds_where(attribute: str) -> list[str]:
    """The oscillation kinds whose class attribute `attribute` is true (for error messages)."""
    return [cls.model_fields["kind"].annotation.__args__[0] for cls in OSCILLATION_KINDS if getattr(cls, attribute)]


Oscillation = Annotated[
    Union[
        OnesOscillation,
        ScalarOscillation,
        VectorKOscillation,
        VectorVOscillation,
        OuterOscillation,
        FullOscillation,
        RotationOscillation,
        CumSoftmaxOscillation,
        DeltaOscillation,
        MatrixOscillation,
    ],
    Field(discriminator="kind"),
]


class OutputStage(Base):
    """What happens to y = mᵀs before the output projection."""

    norm: Literal["none", "rmsnorm", "layernorm"] = "rmsnorm"
    norm_scope: Literal["head", "all"] = Field("head", description="normalise each head, or all heads together")
    gate: Literal["none", "silu", "sigmoid"] = Field("none", description="y ⊙ act(W x) before the projection")
    gate_rank: int | None = Field(None, ge=1, description="low-rank output gate (TNL)")
    gate_first: bool = Field(False, description="gate before the norm, norm(y ⊙ act(W x)) (Mamba2's gated RMSNorm)")
    skip: bool = Field(False, description="add D ⊙ i (Mamba's skip connection)")

    @field_validator("gate_rank", "gate_first")
    @classmethod
    def _gate_rank(cls, v, info: ValidationInfo):
        if info.data.get("gate") == "none":
            raise ValueError("needs an output gate (gate: silu or sigmoid)")
        return v


# --------------------------------------------------------------------------- routing (Mixture-of-Memories)

RoutedStage = Literal["input", "expand", "shrink", "oscillation"]


def _top_k_of(v: int, count: int | None, field: str, of: str) -> int:
    """A router's top_k: 1..count (count None: the field failed its own check)."""
    if v < 1:
        raise ValueError(f"top_k must be at least 1 (got {v})")
    if count is not None and v > count:
        raise ValueError(f"top_k = {v} must be at most {field} = {count} (a token picks top_k of {of})")
    return v


class Routing(Base):
    """Mixture-of-Memories E memories per head, each token routed to top_k of them
    (plus an optional shared memory that sees every token). See docs/spec.md, "Routing"."""

    memories: int = Field(4, description="E, the routed memories per head (>= 1)")
    top_k: int = Field(2, description="memories each token is routed to (1..memories)")
    shared: bool = Field(True, description="an extra memory that sees every token, added unweighted")
    per_memory: list[RoutedStage] = Field(
        default_factory=lambda: ["expand", "input"],
        description="stages with their own projection per memory; the others are shared",
    )
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss")
    aux_loss_scope: Literal["pooled", "per_layer"] = Field(
        "pooled", description="pooled: one loss over the routers of all layers together (fla's MoM model); "
        "per_layer: one loss per layer, summed (the paper-era code; about n_layers times larger at one weight)",
    )
    path: Literal["auto", "dense", "sparse", "reference"] = Field(
        "auto", description="dense: E·H heads, mask folded into e and the gates; sparse: packed varlen; reference: loop"
    )

    @field_validator("memories")
    @classmethod
    def _memories(cls, v):
        if v < 1:
            raise ValueError(f"memories must be at least 1 (got {v})")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v, info: ValidationInfo):
        return _top_k_of(v, info.data.get("memories"), "memories", "the E memories")

    @field_validator("per_memory")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"lists a stage twice: {v}")
        return v


# --------------------------------------------------------------------------- head routing (attention experts)


class HeadRouting(Base):
    """Attention experts (LLaMA-MoE-v2): the mixer's heads in `groups` contiguous groups, a router
    choosing top_k groups per token; the outputs of the other groups are zeroed before the output
    projection. An EOS mixer still updates every head's memory (decoding stays exact). See
    docs/upcycling.md."""

    groups: int = Field(description="G, the head groups (attention experts); must divide the mixer's heads")
    top_k: int = Field(description="groups each token uses (1..groups)")
    scale: float = Field(1.0, gt=0, description="multiplies the routed weights (lcsm upcycle sets G: exact at top_k = G)")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss (one per layer)")

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if v < 2:
            raise ValueError(f"groups must be at least 2 (got {v}); one group routes nothing")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v, info: ValidationInfo):
        return _top_k_of(v, info.data.get("groups"), "groups", "the groups")

    def describe(self) -> str:
        return f"{self.groups} groups, top-{self.top_k}, scale {self.scale:g}, aux {self.aux_loss_weight:g}"


# --------------------------------------------------------------------------- mixers


class EOSMixer(Base):
    """A token mixer running m_t = o_t ⊙ m_{t-1} + e_t i_tᵀ, y_t = m_tᵀ s_t per head."""

    kind: Literal["eos"]
    heads: int | None = Field(None, ge=1, description="default: the model's n_heads")
    head_k: int | None = Field(None, ge=1, description="K per head (or use expand_k)")
    head_v: int | None = Field(None, ge=1, description="V per head (or use expand_v)")
    expand_k: float = Field(1.0, gt=0, description="K·heads = expand_k·d_model when head_k is not given")
    expand_v: float = Field(1.0, gt=0, description="V·heads = expand_v·d_model when head_v is not given")
    input: InputStage = InputStage()
    expand: KeyStage = KeyStage()
    oscillation: Oscillation
    shrink: KeyStage = KeyStage()
    output: OutputStage = OutputStage()
    bias: bool = Field(False, description="biases on the projections")
    routing: Routing | None = Field(None, description="Mixture-of-Memories: route tokens to several memories")
    head_routing: HeadRouting | None = Field(None, description="attention experts: route tokens to groups of heads")

    @field_validator("expand_k", "expand_v")
    @classmethod
    def _ratio_or_size(cls, v, info: ValidationInfo):
        size = "head_k" if info.field_name == "expand_k" else "head_v"
        if info.data.get(size) is not None:
            raise ValueError(f"give either {size} or {info.field_name}, not both")
        return v

    @field_validator("shrink")
    @classmethod
    def _shrink_has_no_tie(cls, v: KeyStage):
        if v.tie != "none":
            raise FieldError("tie", "ties apply to the expand stage only")
        return v

    @model_validator(mode="after")
    def _ties(self):
        osc = self.oscillation
        if self.expand.tie == "one_minus_oscillation":
            if not osc.decay_along_k:
                raise FieldError(("expand", "tie"), f"one_minus_oscillation needs an oscillation kind with a decay along K "
                                 f"({', '.join(kinds_where('decay_along_k'))}; got {osc.kind})")
        if self.input.scale_by == "dt":
            ok = osc.delta_along and getattr(osc, "parametrization", None) == "exp_softplus"
            if not ok:
                raise FieldError(
                    ("input", "scale_by"),
                    f"'dt' needs an oscillation with parametrization exp_softplus and kind {', '.join(kinds_where('delta_along'))} "
                    "(its Δ must run along heads or V)",
                )
        if osc.transition and self.expand.norm != "l2":
            # unnormalised keys make the chunked triangular solve blow up (and the transition expansive)
            raise FieldError(("expand", "norm"), "a delta oscillation needs L2-normalised keys: set expand.norm: l2")
        if osc.rotates:
            for name in ("expand", "shrink"):
                if getattr(self, name).resolved_source != "data" or getattr(self, name).tie != "none":
                    raise FieldError((name, "source"), "rotation needs a data-dependent expand and shrink (source: data)")
        if self.routing is not None:
            _check_routing(self)
        return self

    def dims(self, d_model: int, n_heads: int) -> tuple[int, int, int]:
        """(H, K, V) per head, resolved against the model width."""
        heads = self.heads or n_heads
        k = self.head_k if self.head_k is not None else _per_head(self.expand_k * d_model, heads, "expand_k")
        v = self.head_v if self.head_v is not None else _per_head(self.expand_v * d_model, heads, "expand_v")
        return heads, k, v


def _check_routing(mixer: "EOSMixer") -> None:
    """Routing composes with the separable decays and with stages that do not read each other."""
    osc, routing = mixer.oscillation, mixer.routing
    if not osc.routable:
        raise FieldError(
            ("routing",),
            f"routing needs a separable oscillation ({', '.join(kinds_where('routable'))}); oscillation.kind is '{osc.kind}'",
        )
    ties = (
        (mixer.expand.tie != "none", ("expand", "tie"), "expand.tie"),
        (mixer.input.scale_by != "none", ("input", "scale_by"), "input.scale_by"),
        (mixer.output.skip, ("output", "skip"), "output.skip"),
    )
    for bad, path, name in ties:
        if bad:
            raise FieldError(path, f"{name} ties one stage to another and is not supported with routing; remove it or the routing block")
    if "oscillation" in routing.per_memory:
        if getattr(osc, "source", None) == "fixed":
            raise FieldError(("routing", "per_memory"), "a fixed oscillation is the same for every memory; remove 'oscillation' from per_memory")
        if getattr(osc, "lower_bound", 0.0) == "layerwise":
            raise FieldError(("routing", "per_memory"), "lower_bound: layerwise is learned per head, not per memory; remove 'oscillation' from per_memory")
    if "oscillation" in routing.per_memory and not (hasattr(osc, "source") or osc.transition):
        raise FieldError(("routing", "per_memory"), f"oscillation kind {osc.kind} has no parameters to give each memory; remove 'oscillation'")
    if osc.transition and ("expand" in routing.per_memory) != ("oscillation" in routing.per_memory):
        # the removal key is the expand key and β the oscillation's: one layout for both
        raise FieldError(("routing", "per_memory"), "with a delta oscillation, expand and oscillation are either both per "
                         "memory or both shared (the removal key is the expand key, scaled by the oscillation's β)")


def _per_head(total: float, heads: int, field: str) -> int:
    if abs(total - round(total)) > 1e-9 or round(total) % heads:
        raise FieldError(field, f"{field}·d_model = {total:g} must be a whole multiple of heads = {heads}")
    return round(total) // heads


class AttentionMixer(Base):
    """Causal softmax attention via torch's scaled_dot_product_attention: the baseline."""

    kind: Literal["attention"]
    heads: int | None = Field(None, ge=1)
    position: Literal["rope", "none"] = "rope"
    rope_base: float = Field(10000.0, gt=1.0)
    bias: bool = False
    head_routing: HeadRouting | None = Field(None, description="attention experts: route tokens to groups of heads")


Mixer = Annotated[Union[EOSMixer, AttentionMixer], Field(discriminator="kind")]


class ChannelMixerKind(Base):
    def describe(self) -> str | None:
        """A line for `lcsm show` where the channel mixer is more than a plain feed-forward."""
        return None


class GLUChannelMixer(ChannelMixerKind):
    """W_down(act(W_gate x) ⊙ W_up x) (SwiGLU with silu)."""

    kind: Literal["glu"]
    hidden_ratio: float = Field(8 / 3, gt=0)
    activation: Literal["silu", "gelu", "identity"] = "silu"


class MLPChannelMixer(ChannelMixerKind):
    kind: Literal["mlp"]
    hidden_ratio: float = Field(4.0, gt=0)
    activation: Literal["gelu", "relu", "silu"] = "gelu"


class NoChannelMixer(ChannelMixerKind):
    kind: Literal["none"]


class MoEChannelMixer(ChannelMixerKind):
    """Top-k mixture of GLU experts with a Switch-style load-balancing loss (lcsm/moe.py)."""

    kind: Literal["moe"]
    experts: int = Field(8, ge=2, description="number of routed experts E")
    top_k: int = Field(2, ge=1, description="experts per token")
    hidden_ratio: float = Field(8 / 3, gt=0, description="each expert's hidden size / d_model")
    activation: Literal["silu", "gelu", "identity"] = "silu"
    shared_expert: bool = Field(False, description="an always-on GLU expert added to the routed ones")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight α of α·E·Σ f_e P_e")
    capacity_factor: float | None = Field(None, gt=0, description="none: dropless; else drop tokens past ceil(factor·N·k/E) per expert")
    hidden_size: int | None = Field(None, ge=1, description="each expert's hidden size, exactly (instead of hidden_ratio; "
                                    "lcsm upcycle writes it: a dense GLU's neurons split E ways)")
    shared_hidden_size: int | None = Field(None, ge=1, description="the shared expert's hidden size (default: an expert's)")
    output_scale: float = Field(1.0, gt=0, description="multiplies the routed experts' weighted sum, not the shared "
                                "expert (LLaMA-MoE's scale_factor; lcsm upcycle sets E)")

    def describe(self) -> str:
        size = f" of {self.hidden_size}" if self.hidden_size else ""
        shared = ""
        if self.shared_expert:
            shared = ", shared expert" + (f" of {self.shared_hidden_size}" if self.shared_hidden_size else "")
        return (f"moe: {self.experts} experts{size}, top-{self.top_k}" + shared
                + (f", scale {self.output_scale:g}" if self.output_scale != 1.0 else "")
                + (f", capacity ×{self.capacity_factor:g}" if self.capacity_factor else ", dropless"))

    @model_validator(mode="after")
    def _sizes(self):
        if self.hidden_size is not None and "hidden_ratio" in self.model_fields_set:
            raise FieldError("hidden_size", "give either hidden_size or hidden_ratio, not both")
        if self.shared_hidden_size is not None and not self.shared_expert:
            raise FieldError("shared_hidden_size", "needs shared_expert: true")
        return self

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v, info: ValidationInfo):
        experts = info.data.get("experts")
        if experts is not None and v > experts:
            raise ValueError(f"top_k = {v} must be at most experts = {experts}")
        return v


ChannelMixer = Annotated[
    Union[GLUChannelMixer, MLPChannelMixer, NoChannelMixer, MoEChannelMixer], Field(discriminator="kind")
]


class ModelSpec(Base):
    """A whole language model: embedding, n_layers blocks (pre-norm, token mixer, channel mixer), LM head."""

    name: str | None = None
    description: str | None = None
    references: list[str] = []
    vocab_size: int = Field(8192, ge=2)
    d_model: int = Field(ge=1)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(1, ge=1)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    mixer: Mixer
    channel_mixer: ChannelMixer = GLUChannelMixer(kind="glu")
    tie_embeddings: bool = True

    mixers: dict[str, Mixer] = Field(
        default_factory=dict, description="more named token mixers, for a hybrid `pattern` (e.g. attn: {kind: attention})"
    )
    pattern: list[str] | str | None = Field(
        None,
        description="hybrid layer pattern, repeated to fill n_layers: mixer names ('mixer' is the main one), "
        "as a list or a string with repeats, e.g. 'mixer*7 attn'",
    )

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        if v is None or isinstance(v, list):
            return v
        names = []
        for part in v.replace(",", " ").split():
            name, _, times = part.partition("*")
            if times and not (times.isdigit() and int(times) >= 1):
                raise ValueError(f"'{part}': a repeat is name*N with N a whole number >= 1")
            names += [name] * int(times or 1)
        return names

    def layer_mixer(self, layer_idx: int):
        """The token-mixer spec of layer `layer_idx` (the pattern repeats; no pattern: `mixer`)."""
        if not self.pattern:
            return self.mixer
        name = self.pattern[layer_idx % len(self.pattern)]
        return self.mixer if name == "mixer" else self.mixers[name]

    @model_validator(mode="after")
    def _shapes(self):
        if self.mixers and not self.pattern:
            raise FieldError("mixers", "named mixers need a `pattern` that says which layer uses which")
        if self.pattern is not None:
            if not self.pattern:
                raise FieldError("pattern", "an empty pattern; give at least one mixer name")
            if "mixer" in self.mixers:
                raise FieldError(("mixers", "mixer"), "the name 'mixer' is the main mixer's; choose another name")
            allowed = ["mixer", *self.mixers]
            for name in self.pattern:
                if name not in allowed:
                    raise FieldError("pattern", f"unknown mixer '{name}'; allowed: {', '.join(allowed)} (name more under `mixers`)")
            if self.n_layers % len(self.pattern):
                raise FieldError(
                    "pattern", f"the pattern has {len(self.pattern)} layers, which must divide n_layers = {self.n_layers}"
                )
        self._check_mixer(self.mixer, ("mixer",))
        for name, mixer in self.mixers.items():
            self._check_mixer(mixer, ("mixers", name))
            if getattr(getattr(mixer, "oscillation", None), "lower_bound", None) == "layerwise":
                raise FieldError(("mixers", name, "oscillation", "lower_bound"), "layerwise lower bounds belong to the main `mixer` only")
        return self

    def _check_mixer(self, mixer, where: tuple):
        heads = mixer.heads or self.n_heads
        if mixer.head_routing is not None and heads % mixer.head_routing.groups:
            raise FieldError(where + ("head_routing", "groups"),
                             f"groups = {mixer.head_routing.groups} must divide the mixer's heads = {heads}")
        if isinstance(mixer, AttentionMixer):
            if self.d_model % heads:
                at = where + ("heads",) if mixer.heads else ("n_heads",)
                raise FieldError(at, f"heads = {heads} must divide d_model = {self.d_model}")
            if mixer.position == "rope" and (self.d_model // heads) % 2:
                raise FieldError(where + ("position",), f"rope needs an even head size (d_model/heads = {self.d_model // heads})")
            return
        if mixer.heads is None and self.d_model % heads:
            raise FieldError(("n_heads",), f"n_heads = {heads} must divide d_model = {self.d_model}")
        try:
            _, k, _ = mixer.dims(self.d_model, self.n_heads)
        except FieldError as err:
            raise FieldError(where + err.path, str(err)) from None
        if mixer.oscillation.rotates and k % 2:
            raise FieldError(where + ("head_k",), f"rotation needs an even K per head (cos and sin halves); got K = {k}")




# --------------------------------------------------------------------------- loading


def parse_model_spec(data: Any, source: str = "<spec>", node: yaml.Node | None = None) -> ModelSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a model spec is a mapping of fields (got {type(data).__name__})")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_errors(err, data, source, node)) from None


def load_model_spec(spec: str | Path | dict | ModelSpec) -> ModelSpec:
    """A ModelSpec from a path, a zoo name, a dict or a ModelSpec. Raises SpecError."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return parse_model_spec(spec)
    path = resolve_spec_path(spec)
    data, node = load_yaml(path)
    return parse_model_spec(data, str(spec), node)



def spec_json_schema() -> dict:
    return ModelSpec.model_json_schema()
