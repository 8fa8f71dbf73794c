"""Llama family (also mistral through the registry's alias table); the other llama-like families build
through `build_from` with their own DecoderArgs (decoder.py has the full form).

x = embed(ids)
per layer:  x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x)), past))
            x += down(silu(gate(n2(x))) * up(n2(x)))
logits = head(norm(x))
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused, rope
from .decoder import Decoder as LlamaDecoder
from .decoder import DecoderArgs as LlamaArgs
from .decoder import build_plain, global_rotary, hf_to_ours

__all__ = ["LlamaArgs", "LlamaDecoder", "build", "context_length", "hf_to_ours"]


def context_length(config) -> int:
    return rope.context_length(config)


GRAPHS = ("fused", "plain")  # the graphs this family exports (fused.py builds the fused one)


def build(config, state: dict[str, torch.Tensor], graph: str = "plain") -> nn.Module:
    args = LlamaArgs.from_config(config)
    return build_from(args, config, hf_to_ours(state, args), graph)


def build_from(args: LlamaArgs, config, tensors: dict[str, torch.Tensor], graph: str, rotaries=None):
    """The plain or fused module of a llama-like family from its args and weights under our names
    (rotaries: {"global": ..., ["local": ...]}, the config's own rotary when None)."""
    rotaries = rotaries or global_rotary(config, args)  # refuses an unknown rope type before weight work
    if graph == "fused":
        return fused.build(args, rotaries, tensors, context_length(config))
    return build_plain(args, rotaries, tensors)


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    from .common import load_state

    load_state(module, tensors)
    return module.eval()
