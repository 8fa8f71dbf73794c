"""Granite (3.x dense): the llama decoder with four multipliers from the config.

x = embed(ids) * embedding_multiplier
x += attn(...) * residual_multiplier        scores = q·kᵀ * attention_multiplier (not 1/sqrt(d))
x += mlp(...) * residual_multiplier
logits = head(norm(x)) / logits_scaling
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import rope
from .llama import LlamaArgs, build_from, hf_to_ours


def context_length(config) -> int:
    return rope.context_length(config)


def args_from_config(config) -> LlamaArgs:
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        embed_scale=float(config.embedding_multiplier),
        residual_scale=float(config.residual_multiplier),
        attn_scale=float(config.attention_multiplier),
        logits_divisor=float(config.logits_scaling),
    )


GRAPHS = ("fused", "plain")  # fused: the attention multiplier is GroupQueryAttention's scale


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, hf_to_ours(state, args), graph)
