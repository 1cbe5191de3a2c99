"""lcsm models in Hugging Face `transformers`: LcsmConfig, LcsmForCausalLM, their registration with
the Auto classes, and the export of a run (`lcsm export RUN --hf DIR`).

    import lcsm                      # registers as soon as transformers is imported (lcsm/__init__.py)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("DIR")          # no trust_remote_code
    tok = AutoTokenizer.from_pretrained("DIR")
    out = model.generate(**tok("The function", return_tensors="pt"), max_new_tokens=20, do_sample=False)

`import lcsm.hf` registers at once (it imports transformers, an optional extra: pip install
'lcsm[hf]'). LcsmForCausalLM wraps lcsm's Model (`.model`, the same parameter names under
"model."): its forward is Model.forward, and `generate()` prefills the prompt with the chunked
kernel and then decodes one token at a time from lcsm's recurrent cache (lcsm/nn/cache.py: EOS
memories, conv tails, positions, normalisers, KV caches of attention layers), not from a
transformers KV cache. Greedy and sampled decoding are supported; padded batches are not (a
recurrent state has no room for a hole): give prompts of one length, or one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import ModelOutput
    from transformers import PretrainedConfig
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("lcsm.hf needs the 'transformers' package: pip install 'lcsm[hf]'") from e

from lcsm.config.spec import ModelSpec
from lcsm.nn.cache import new_cache
from lcsm.nn.model import Model

MODEL_TYPE = "lcsm"


class LcsmConfig(PretrainedConfig):
    """The configuration of an lcsm model: `spec`, its ModelSpec as a mapping (what config.yaml's
    model section holds), plus the fields transformers reads (vocab_size, tie_word_embeddings,
    the special token ids)."""

    model_type = MODEL_TYPE

    def __init__(self, spec: dict | None = None, **kwargs):
        self.spec = spec or {}
        if spec:
            parsed = ModelSpec.model_validate(spec)
            kwargs.setdefault("vocab_size", parsed.vocab_size)
            kwargs.setdefault("hidden_size", parsed.d_model)
            kwargs.setdefault("num_hidden_layers", parsed.n_layers)
            kwargs.setdefault("tie_word_embeddings", parsed.tie_embeddings)
        super().__init__(**kwargs)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.spec)


@dataclass
class LcsmCausalLMOutput(ModelOutput):
    """loss (with labels), logits [B,T,vocab], lcsm_cache (lcsm's per-layer cache, when decoding)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lcsm_cache: list | None = None


class LcsmForCausalLM(PreTrainedModel, GenerationMixin):
    """An lcsm Model as a transformers causal LM. forward(input_ids [B,T], labels=None,
    lcsm_cache=None, use_cache=None) -> LcsmCausalLMOutput; the loss is transformers' convention
    (labels are the inputs, shifted inside)."""

    config_class = LcsmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # a recurrent state: no assisted or contrastive decoding
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: LcsmConfig):
        super().__init__(config)
        # from_pretrained builds models on the meta device and then loads the parameters; lcsm's
        # stages also keep constants that are not parameters (fp64 rotation angles, fixed decay
        # slopes), which must be real: build on the CPU (the weights are loaded into it after)
        device = torch.get_default_device()
        with torch.device("cpu" if device.type == "meta" else device):
            self.model = Model(config.model_spec)
        if not config.tie_word_embeddings:
            type(self)._tied_weights_keys = {}
        self.post_init()

    def _init_weights(self, module):
        pass  # lcsm's Model initialises itself; loaded weights replace it

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent cache is lcsm's own (lcsm_cache)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                lcsm_cache: list | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, **unused) -> LcsmCausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("lcsm models take unpadded inputs (a recurrent state cannot skip a padding token): "
                             "give prompts of one length, or one at a time")
        if use_cache and lcsm_cache is None:
            lcsm_cache = new_cache(self.model)
        logits = self.model(input_ids, cache=lcsm_cache if use_cache else None, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=-100)
        return LcsmCausalLMOutput(loss=loss, logits=logits, lcsm_cache=lcsm_cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, lcsm_cache=None, attention_mask=None, use_cache=True, **kwargs):
        """The whole prompt first (prefill), then only the newest token: the cache holds the rest."""
        if lcsm_cache is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "lcsm_cache": lcsm_cache, "attention_mask": None if lcsm_cache is not None else attention_mask,
                "use_cache": True, "logits_to_keep": 1}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens=num_new_tokens)
        model_kwargs["lcsm_cache"] = outputs.lcsm_cache
        return model_kwargs


def register() -> None:
    """Register LcsmConfig / LcsmForCausalLM with AutoConfig / AutoModelForCausalLM (once)."""
    try:
        AutoConfig.register(MODEL_TYPE, LcsmConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(LcsmConfig, LcsmForCausalLM)
    except ValueError:
        pass


register()


# --------------------------------------------------------------------------- export


class ExportError(ValueError):
    """A run cannot be exported; str() is the message for the user."""


def byte_tokenizer(eos: bool):
    """A `tokenizers` tokenizer whose ids are the UTF-8 bytes (lcsm's bytes tokenizer): a BPE with
    no merges over the byte-level alphabet; with eos, id 256 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if eos:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def export(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a run (or checkpoint) as a transformers model folder: config.json, model.safetensors,
    generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json) when the run
    has text. Returns the folder. Raises ExportError (and lcsm's RecipeError for a bad run)."""
    from lcsm.run.evaluate import load_run

    recipe, model, run_dir, step = load_run(run)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"--hf {out}: exists and is not an empty folder; give a new folder (or --overwrite)")
    tok_files, eos_id = _tokenizer(recipe, run_dir)
    config = LcsmConfig(spec=recipe.model.model_dump(mode="json", exclude_unset=True) | {"vocab_size": recipe.model.vocab_size},
                        eos_token_id=eos_id, lcsm={"run": str(run_dir), "step": step, "task": recipe.task.kind})
    hf = LcsmForCausalLM(config)
    hf.model.load_state_dict(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    if tok_files is not None:
        tok, eos_token = tok_files
        tok.save(str(out / "tokenizer.json"))
        config_tok = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
        if eos_token is not None:
            config_tok["eos_token"] = eos_token
        (out / "tokenizer_config.json").write_text(json.dumps(config_tok, indent=2) + "\n")
    return out


def _tokenizer(recipe, run_dir: Path):
    """((a tokenizers.Tokenizer, its EOS token or None), EOS id or None) for the run's text, or (None, None)."""
    tok = recipe.task.load_tokenizer(run_dir)
    if tok is None:
        return None, None
    base = getattr(tok, "base", tok)  # a corpus's tokenizer wraps its base with the EOS
    eos_id = getattr(tok, "eos_id", None)
    inner = getattr(base, "tok", None)
    if inner is None:  # bytes
        t = byte_tokenizer(eos=eos_id is not None)
        return (t, "<|endoftext|>" if eos_id is not None else None), eos_id
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(inner.to_str())
    eos_token = getattr(tok, "info", {}).get("eos_token")
    if eos_id is not None and eos_token is None:  # an EOS appended after the vocabulary
        t.add_special_tokens(["<|endoftext|>"])
        eos_token = "<|endoftext|>"
    return (t, eos_token), eos_id
