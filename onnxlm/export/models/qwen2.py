"""Qwen2: the llama module with biased q/k/v (o_proj and the MLP unbiased).

Sliding-window attention applies only when `use_sliding_window` is set, and then only to the layers
transformers marks "sliding_attention" (those at index >= max_window_layers, or `config.layer_types`).
When the layers disagree, each layer gets its own mask.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import fused
from .common import causal_mask, output_head
from .llama import LlamaArgs, LlamaDecoder, _load, hf_to_ours


def context_length(config) -> int:
    return config.max_position_embeddings


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None: full attention), as transformers' Qwen2 decides it."""
    window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
    if window is None:
        return [None] * config.num_hidden_layers
    types = getattr(config, "layer_types", None) or [
        "sliding_attention" if i >= config.max_window_layers else "full_attention"
        for i in range(config.num_hidden_layers)
    ]
    return [window if t == "sliding_attention" else None for t in types]


def args_from_config(config) -> LlamaArgs:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"qwen2 with hidden_act {act!r} is not supported (only silu)")
    windows = set(layer_windows(config))
    return dataclasses.replace(
        LlamaArgs.from_config(config),
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
        sliding_window=windows.pop() if len(windows) == 1 else None,
    )


class Qwen2MixedWindowDecoder(LlamaDecoder):
    """Llama decoder whose layers differ in sliding window (some full, some windowed)."""

    def __init__(self, a: LlamaArgs, config):
        super().__init__(a, config)
        self.windows = layer_windows(config)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        seq = input_ids.shape[1]
        masks = {w: causal_mask(attention_mask, seq, x.dtype, w) for w in set(self.windows)}
        cos_sin = self.rotary.cos_sin(position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos_sin, masks[self.windows[i]], self.rotary, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        head = self.embed_tokens.weight if self.a.tie_word_embeddings else self.lm_head.weight
        return (output_head(self.norm(x), head), *presents)


GRAPHS = ("fused", "plain")  # the fused graph gives each layer its own window


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    if graph == "fused":
        return fused.build(
            args, config, hf_to_ours(state, args), layer_windows(config), context_length(config)
        )
    mixed = len(set(layer_windows(config))) > 1
    module = (Qwen2MixedWindowDecoder if mixed else LlamaDecoder)(args, config)
    return _load(module, hf_to_ours(state, args))
