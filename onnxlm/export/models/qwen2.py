"""Qwen2: the llama module with biased q/k/v (o_proj and the MLP unbiased).

Sliding-window attention applies only when `use_sliding_window` is set, and then only to the layers
transformers marks "sliding_attention" (those at index >= max_window_layers, or `config.layer_types`);
each layer gets its own mask (plain) or window (fused).
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
    """The sliding window of each layer (None: full attention), as transformers' Qwen2 decides it."""
    types = layer_types(config)
    window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
    if window is None:
        return [None] * config.num_hidden_layers
    types = types or [
        "sliding_attention" if i >= config.max_window_layers else "full_attention"
        for i in range(config.num_hidden_layers)
    ]
    return [window if t == "sliding_attention" else None for t in types]


def args_from_config(config) -> LlamaArgs:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"qwen2 with hidden_act {act!r} is not supported (only silu)")
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
        sliding_window=None,
        layer_windows=tuple(layer_windows(config)),
    )


GRAPHS = ("fused", "plain")  # the fused graph gives each layer its own window


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, hf_to_ours(state, args), graph)
