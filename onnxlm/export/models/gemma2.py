"""Gemma 2: the llama decoder with

x = embed(ids) * sqrt(hidden)
RMSNorm scales by (1 + w): the weights get their 1 added at load time, so the norm is the usual one
x += attn_out_norm(attn(input_layernorm(x)))               norms before and after attention
x += mlp_out_norm(mlp(pre_feedforward_layernorm(x)))       and the MLP; gelu-tanh gate
scores = cap·tanh(q·kᵀ · query_pre_attn_scalar^-½ / cap)   attn_logit_softcapping
logits = cap·tanh(head(norm(x)) / cap)                     final_logit_softcapping
sliding window on the layers layer_types marks "sliding_attention" (every other one)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import rope
from .decoder import layer_types
from .llama import LlamaArgs, build_from, hf_to_ours

# transformers' names -> ours (decoder.Block: post_attention_layernorm is the norm before the MLP)
RENAMES = {
    "post_attention_layernorm": "attn_out_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp_out_norm",
}


def context_length(config) -> int:
    return rope.context_length(config)


def layer_windows(config) -> tuple[int | None, ...]:
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in layer_types(config))


def gemma_args(config) -> LlamaArgs:
    """What Gemma 2 and 3 share."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise NotImplementedError(f"{config.model_type}: hidden_activation {act!r} is not exported")
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        act="gelu_tanh",
        post_norms=True,
        embed_scale=float(config.hidden_size**0.5),
        attn_scale=float(config.query_pre_attn_scalar**-0.5),
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        sliding_window=None,
        layer_windows=layer_windows(config),
    )


def gemma_tensors(state, args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Our names, every RMSNorm weight w as 1 + w (transformers computes the same sum in fp32)."""
    tensors = hf_to_ours(state, args, RENAMES)
    return {n: (1.0 + t.float() if n.endswith("norm.weight") else t) for n, t in tensors.items()}


GRAPHS = ("fused", "plain")  # fused: softcap, scale and local_window_size are GroupQueryAttention's


def build(config, state, graph: str = "plain") -> nn.Module:
    args = gemma_args(config)
    return build_from(args, config, gemma_tensors(state, args), graph)
