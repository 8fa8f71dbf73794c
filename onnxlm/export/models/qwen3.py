"""Qwen3: the llama decoder with q and k RMS-normed per head before the rotary; head_dim is its own
config field (not hidden / heads), heads tied or not. Sliding windows as in Qwen2 (layer_types).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import rope
from .llama import LlamaArgs, build_from, hf_to_ours
from .qwen2 import layer_windows


def context_length(config) -> int:
    return rope.context_length(config)


def args_from_config(config) -> LlamaArgs:
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        qk_norm="head",
        sliding_window=None,
        layer_windows=tuple(layer_windows(config)),
    )


GRAPHS = ("fused", "plain")  # fused: the q/k norms run before GroupQueryAttention, which rotates


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, hf_to_ours(state, args), graph)
