"""SmolLM3: the llama decoder where the layers `no_rope_layers` marks 0 have no rotary (NoPE), and sliding
windows where `use_sliding_window` is set and layer_types says "sliding_attention".
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import rope
from .decoder import layer_types
from .llama import LlamaArgs, build_from, hf_to_ours


def context_length(config) -> int:
    return rope.context_length(config)


def layer_windows(config) -> list[int | None]:
    n = config.num_hidden_layers
    types = layer_types(config) or ["full_attention"] * n
    if not getattr(config, "use_sliding_window", False) or config.sliding_window is None:
        return [None] * n
    return [config.sliding_window if t == "sliding_attention" else None for t in types]


def args_from_config(config) -> LlamaArgs:
    uses_rope = config.no_rope_layers  # 1: the layer rotates q and k, 0: it does not
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        sliding_window=None,
        layer_windows=tuple(layer_windows(config)),
        layer_rope=tuple("global" if r else None for r in uses_rope),
    )


GRAPHS = ("fused", "plain")  # fused: a NoPE layer's GroupQueryAttention has do_rotary=0


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, hf_to_ours(state, args), graph)
