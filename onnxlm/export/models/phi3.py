"""Phi-3: the llama module; the checkpoint's fused projections are split at load time.

    qkv_proj     (heads*d + 2*kv_heads*d, hidden) -> q_proj, k_proj, v_proj   (rows in that order)
    gate_up_proj (2*intermediate, hidden)         -> gate_proj, up_proj       (gate first, as transformers' chunk)

partial_rotary_factor (Phi-4-mini) and longrope scaling (Phi-3.5-mini, Phi-4-mini) come from
common.rotary_from_config: a row rotates with the short factors while it holds at most
original_max_position_embeddings tokens and with the long ones past it, chosen per row by the graph's
long_rope input; the runtime re-prefills a row from position 0 at the call that takes it past that length
(runtime/driver.RowsBase), as transformers' generate recomputes its cache there.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import rope
from .llama import LlamaArgs, build_from, hf_to_ours


def context_length(config) -> int:
    return rope.context_length(config)


def args_from_config(config) -> LlamaArgs:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"phi3 with hidden_act {act!r} is not supported (only silu)")
    return dataclasses.replace(LlamaArgs.from_config(config), qkv_bias=False, o_bias=False, mlp_bias=False)


def split_fused(state: dict[str, torch.Tensor], a: LlamaArgs) -> dict[str, torch.Tensor]:
    """Replace every qkv_proj / gate_up_proj weight by its parts, under the llama names."""
    q_rows = a.num_heads * a.head_dim
    kv_rows = a.num_kv_heads * a.head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("qkv_proj.weight"):
            if t.shape[0] != q_rows + 2 * kv_rows:
                raise ValueError(f"{name}: {t.shape[0]} rows, expected {q_rows + 2 * kv_rows}")
            prefix = name.removesuffix("qkv_proj.weight")
            parts = torch.split(t, [q_rows, kv_rows, kv_rows], dim=0)
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                out[f"{prefix}{part}.weight"] = piece
        elif name.endswith("gate_up_proj.weight"):
            if t.shape[0] != 2 * a.intermediate_size:
                raise ValueError(f"{name}: {t.shape[0]} rows, expected {2 * a.intermediate_size}")
            prefix = name.removesuffix("gate_up_proj.weight")
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = torch.chunk(t, 2, dim=0)
        else:
            out[name] = t
    return out


GRAPHS = ("fused", "plain")  # fused needs rotary_dim a multiple of 16 (see fused.build)


def build(config, state, graph: str = "plain") -> nn.Module:
    args = args_from_config(config)  # the fused graph merges q|k|v again: split and re-merged, same order
    return build_from(args, config, hf_to_ours(split_fused(state, args), args), graph)
