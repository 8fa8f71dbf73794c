"""Llama family (also mistral through the registry's alias table; qwen2 and phi3 reuse the module).

x = embed(ids)
per layer:  x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x)), past))
            x += down(silu(gate(n2(x))) * up(n2(x)))
logits = head(norm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import fused
from .common import RMSNorm, attend, causal_mask, merge_heads, output_head, rotary_from_config, split_heads


@dataclass
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config) -> LlamaArgs:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"{config.model_type} with hidden_act {act!r}: only silu is exported")
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(config, "attention_bias", False)),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=getattr(config, "sliding_window", None),
        )


class Block(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.a = a
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x, cos_sin, mask, rotary, past_k, past_v):
        a = self.a
        h = self.input_layernorm(x)
        q = split_heads(self.q_proj(h), a.num_heads, a.head_dim)  # (batch, heads, seq, d)
        k = split_heads(self.k_proj(h), a.num_kv_heads, a.head_dim)  # (batch, kv_heads, seq, d)
        v = split_heads(self.v_proj(h), a.num_kv_heads, a.head_dim)
        q, k = rotary.apply(q, *cos_sin), rotary.apply(k, *cos_sin)
        k = torch.cat((past_k, k), dim=2)  # (batch, kv_heads, total, d)
        v = torch.cat((past_v, v), dim=2)
        x = x + self.o_proj(merge_heads(attend(q, k, v, mask)))
        h = self.post_attention_layernorm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, k, v


class LlamaDecoder(nn.Module):
    uses_position_ids = True

    def __init__(self, a: LlamaArgs, config):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotary = rotary_from_config(config, a.head_dim)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        mask = causal_mask(attention_mask, input_ids.shape[1], x.dtype, self.a.sliding_window)
        cos_sin = self.rotary.cos_sin(position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos_sin, mask, self.rotary, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        head = self.embed_tokens.weight if self.a.tie_word_embeddings else self.lm_head.weight
        return (output_head(self.norm(x), head), *presents)


def hf_to_ours(state: dict[str, torch.Tensor], a: LlamaArgs) -> dict[str, torch.Tensor]:
    """Rename a transformers Llama/Mistral/Qwen2 state dict to this module's names."""
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        n = name.removeprefix("model.")
        n = n.replace("self_attn.", "").replace("mlp.", "")
        if n == "lm_head.weight" and a.tie_word_embeddings:
            continue
        out[n] = t
    return out


def context_length(config) -> int:
    return int(config.max_position_embeddings)


GRAPHS = ("fused", "plain")  # the graphs this family exports (fused.py builds the fused one)


def build(config, state: dict[str, torch.Tensor], graph: str = "plain") -> nn.Module:
    args = LlamaArgs.from_config(config)
    tensors = hf_to_ours(state, args)
    if graph == "fused":
        windows = [args.sliding_window] * args.num_layers
        return fused.build(args, config, tensors, windows, context_length(config))
    return _load(LlamaDecoder(args, config), tensors)


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    from .common import load_state

    load_state(module, tensors)
    return module.eval()
