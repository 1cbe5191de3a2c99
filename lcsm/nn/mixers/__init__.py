"""Token mixers and their registry: `MIXERS` maps each spec `kind` to its module class; a routed
EOS mixer (a `routing:` block) is the Mixture-of-Memories mixer. Nothing outside this module builds
a mixer by name. Every mixer: forward(x [B,T,d], cache=None) -> [B,T,d]; label; state_size();
state_grows; flops_per_token(context); fixed_state (its decoding state keeps one size)."""

from __future__ import annotations

import torch.nn as nn

from lcsm.nn.context import LayerContext
from lcsm.nn.mixers.attention import AttentionMixer
from lcsm.nn.mixers.eos import EOSMixer
from lcsm.nn.mixers.mom import MoMMixer

MIXERS: dict[str, type[nn.Module]] = {"eos": EOSMixer, "attention": AttentionMixer}


def build_mixer(spec, ctx: LayerContext) -> nn.Module:
    """The token mixer of one layer from its spec (an lcsm.config.spec mixer)."""
    if getattr(spec, "routing", None) is not None:
        return MoMMixer(spec, ctx)
    return MIXERS[spec.kind](spec, ctx)
