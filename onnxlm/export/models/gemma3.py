"""Gemma 3 text (model_type gemma3_text): Gemma 2 (see gemma2.py) with q and k RMS-normed per head
(1 + w, like every Gemma norm) and two rotaries: the sliding-window layers rotate with
`rope_local_base_freq` (transformers 5: rope_parameters["sliding_attention"]), the full-attention ones
with the global base and its scaling. layer_types holds the pattern (five local layers, one global).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import rope
from .common import rotary_from_config
from .gemma2 import gemma_args, gemma_tensors
from .llama import build_from


def context_length(config) -> int:
    return rope.context_length(config)


def rotaries(config, head_dim: int) -> dict:
    if rope.per_layer_type(config):  # transformers 5
        local = rope.rope_params(config, "sliding_attention")
        glob = rope.rope_params(config, "full_attention")
        return {
            "global": rotary_from_config(config, head_dim, glob, "full_attention"),
            "local": rotary_from_config(config, head_dim, local, "sliding_attention"),
        }
    local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq, "partial_rotary_factor": 1.0}
    return {
        "global": rotary_from_config(config, head_dim),
        "local": rotary_from_config(config, head_dim, local),
    }


def args_from_config(config):
    if getattr(config, "use_bidirectional_attention", False):
        raise NotImplementedError("gemma3_text with use_bidirectional_attention (an encoder) is not exported")
    args = gemma_args(config)
    ropes = tuple("local" if t == "sliding_attention" else "global" for t in config.layer_types)
    # transformers' Gemma 3 reads attn_logit_softcapping into the config but never applies it (q/k norms
    # bound the scores instead): the reference, so neither do we
    return dataclasses.replace(args, qk_norm="head", layer_rope=ropes, attn_softcap=None)


GRAPHS = ("fused", "plain")  # fused: local and global layers read their own cos/sin caches


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, gemma_tensors(state, args), graph, rotaries(config, args.head_dim))
