"""BLOOM: ALiBi (no position ids), embedding LayerNorm, fused per-head query_key_value, tied head.

    x = word_embeddings_layernorm(word_embeddings(ids))
    per layer:  h = input_layernorm(x); x = (h if post_ln_residual else x) + dense(attn(qkv(h), alibi, past))
                h = post_attention_layernorm(x); x = (h if post_ln_residual else x) + mlp(h)
    logits = head(ln_f(x))

ALiBi follows transformers' build_alibi_tensor: a bias slope[head] * position[key] added to the scores,
the key's position being its count of non-padding slots before it ((cumsum(mask) - 1) * mask), so left
padding gives what transformers gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import attend, causal_mask, merge_heads, output_head


@dataclass
class BloomArgs:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_norm_eps: float
    post_ln_residual: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> BloomArgs:
        hidden, heads = config.hidden_size, config.n_head
        return cls(
            hidden_size=hidden,
            num_layers=config.n_layer,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            vocab_size=config.vocab_size,
            layer_norm_eps=config.layer_norm_epsilon,
            post_ln_residual=bool(config.apply_residual_connection_post_layernorm),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )


def context_length(config) -> int:
    return getattr(config, "seq_length", None) or 2048


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes, computed as transformers' build_alibi_tensor computes them."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra], dim=0)
    return slopes  # (heads,)


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Block(nn.Module):
    def __init__(self, a: BloomArgs):
        super().__init__()
        self.a = a
        self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.query_key_value = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.dense_h_to_4h = nn.Linear(a.hidden_size, 4 * a.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * a.hidden_size, a.hidden_size)

    def forward(self, x, bias, past_k, past_v):
        a = self.a
        h = self.input_layernorm(x)
        batch, seq, _ = h.shape
        fused = self.query_key_value(h).view(batch, seq, a.num_heads, 3, a.head_dim)  # per-head q, k, v
        q = fused[..., 0, :].transpose(1, 2)  # (batch, heads, seq, d)
        k = torch.cat((past_k, fused[..., 1, :].transpose(1, 2)), dim=2)  # (batch, heads, total, d)
        v = torch.cat((past_v, fused[..., 2, :].transpose(1, 2)), dim=2)
        x = (h if a.post_ln_residual else x) + self.dense(merge_heads(attend(q, k, v, bias)))
        h = self.post_attention_layernorm(x)
        x = (h if a.post_ln_residual else x) + self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(h)))
        return x, k, v


class BloomDecoder(nn.Module):
    uses_position_ids = False

    def __init__(self, a: BloomArgs):
        super().__init__()
        self.a = a
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.h = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.ln_f = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.register_buffer("slopes", alibi_slopes(a.num_heads)[:, None, None], persistent=False)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, *past):
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # (batch, seq, hidden)
        positions = (attention_mask.cumsum(dim=-1) - 1) * attention_mask  # (batch, total), pads at 0
        alibi = self.slopes * positions[:, None, None, :].float()  # (batch, heads, 1, total)
        bias = alibi + causal_mask(attention_mask, input_ids.shape[1], x.dtype)  # (batch, heads, seq, total)
        presents = []
        for i, layer in enumerate(self.h):
            x, k, v = layer(x, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        head = self.word_embeddings.weight if self.a.tie_word_embeddings else self.lm_head.weight
        return (output_head(self.ln_f(x), head), *presents)


def hf_to_ours(state: dict[str, torch.Tensor], a: BloomArgs) -> dict[str, torch.Tensor]:
    """Rename a transformers BLOOM state dict (with or without the `transformer.` prefix) to ours."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not a.tie_word_embeddings:
                out[name] = t
            continue
        n = name.removeprefix("transformer.").replace(".self_attention.", ".").replace(".mlp.", ".")
        out[n] = t
    return out


def build(config, state) -> BloomDecoder:
    from .llama import _load

    args = BloomArgs.from_config(config)  # slow_but_exact's sliced matmuls are one matmul here
    return _load(BloomDecoder(args), hf_to_ours(state, args))
