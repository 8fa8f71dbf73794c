"""OLMo 2: no norms before attention or MLP; their outputs are normed before the residual add, and q and k
are RMS-normed over the whole projection (all heads at once) before the rotary.

    x += attn_out_norm(o(attn(rope(q_norm(q(x))), rope(k_norm(k(x))), v(x))))
    x += mlp_out_norm(down(silu(gate(x)) * up(x)))
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import rope
from .llama import LlamaArgs, build_from, hf_to_ours

# transformers' names -> ours (decoder.Block)
RENAMES = {"post_attention_layernorm": "attn_out_norm", "post_feedforward_layernorm": "mlp_out_norm"}


def context_length(config) -> int:
    return rope.context_length(config)


def args_from_config(config) -> LlamaArgs:
    return dataclasses.replace(
        LlamaArgs.from_config(config), qk_norm="proj", pre_norms=False, post_norms=True
    )


GRAPHS = ("fused", "plain")


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)
    return build_from(args, config, hf_to_ours(state, args, RENAMES), graph)
