"""GPT-2: learned absolute positions, LayerNorm, fused c_attn, gelu_new, tied head.

    x = wte(ids) + wpe(position_ids)
    per layer:  x += c_proj(attn(split(c_attn(ln_1(x))), past))
                x += mlp.c_proj(act(c_fc(ln_2(x))))
    logits = head(ln_f(x))

transformers stores GPT-2's Conv1D weights as (in, out); they are transposed at load into nn.Linear's
(out, in). Attention scores are scaled by 1/sqrt(head_dim) when scale_attn_weights, and further by
1/(layer_idx + 1) when scale_attn_by_inverse_layer_idx, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import attend, causal_mask, merge_heads, output_head, split_heads

# transformers' activation names -> the same function (the tanh forms are one formula)
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# names transformers checkpoints may carry that are not weights (old causal-mask buffers)
_BUFFERS = (".attn.bias", ".attn.masked_bias")


@dataclass
class Gpt2Args:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> Gpt2Args:
        if getattr(config, "add_cross_attention", False):
            raise NotImplementedError("gpt2 with cross-attention is not supported")
        act = config.activation_function
        if act not in ACTIVATIONS:
            raise NotImplementedError(
                f"gpt2 activation {act!r} is not supported; known: {sorted(ACTIVATIONS)}"
            )
        hidden, heads = config.n_embd, config.n_head
        return cls(
            hidden_size=hidden,
            intermediate_size=config.n_inner or 4 * hidden,
            num_layers=config.n_layer,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            vocab_size=config.vocab_size,
            max_positions=config.n_positions,
            layer_norm_eps=config.layer_norm_epsilon,
            activation=act,
            scale_attn_weights=bool(config.scale_attn_weights),
            scale_attn_by_inverse_layer_idx=bool(config.scale_attn_by_inverse_layer_idx),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )


def context_length(config) -> int:
    return config.n_positions


class Block(nn.Module):
    def __init__(self, a: Gpt2Args, layer_idx: int):
        super().__init__()
        self.a = a
        self.ln_1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.c_attn = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.c_proj = nn.Linear(a.hidden_size, a.hidden_size)
        self.ln_2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.c_fc = nn.Linear(a.hidden_size, a.intermediate_size)
        self.mlp_c_proj = nn.Linear(a.intermediate_size, a.hidden_size)
        scale = 1.0 / math.sqrt(a.head_dim) if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.act = ACTIVATIONS[a.activation]

    def forward(self, x, mask, past_k, past_v):
        a = self.a
        q, k, v = self.c_attn(self.ln_1(x)).split(a.hidden_size, dim=2)
        q = split_heads(q, a.num_heads, a.head_dim)  # (batch, heads, seq, d)
        k = torch.cat((past_k, split_heads(k, a.num_heads, a.head_dim)), dim=2)  # (batch, heads, total, d)
        v = torch.cat((past_v, split_heads(v, a.num_heads, a.head_dim)), dim=2)
        x = x + self.c_proj(merge_heads(attend(q, k, v, mask, self.scale)))
        x = x + self.mlp_c_proj(self.act(self.c_fc(self.ln_2(x))))
        return x, k, v


class Gpt2Decoder(nn.Module):
    uses_position_ids = True

    def __init__(self, a: Gpt2Args):
        super().__init__()
        self.a = a
        self.wte = nn.Embedding(a.vocab_size, a.hidden_size)
        self.wpe = nn.Embedding(a.max_positions, a.hidden_size)
        self.h = nn.ModuleList(Block(a, i) for i in range(a.num_layers))
        self.ln_f = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.wte(input_ids) + self.wpe(position_ids)  # (batch, seq, hidden)
        mask = causal_mask(attention_mask, input_ids.shape[1], x.dtype)
        presents = []
        for i, layer in enumerate(self.h):
            x, k, v = layer(x, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        head = self.wte.weight if self.a.tie_word_embeddings else self.lm_head.weight
        return (output_head(self.ln_f(x), head), *presents)


def hf_to_ours(state: dict[str, torch.Tensor], a: Gpt2Args) -> dict[str, torch.Tensor]:
    """Rename a transformers GPT-2 state dict (with or without the `transformer.` prefix) to ours,
    transposing the Conv1D weights."""
    out = {}
    for name, t in state.items():
        if name.endswith(_BUFFERS):
            continue
        if name == "lm_head.weight":
            if not a.tie_word_embeddings:
                out[name] = t
            continue
        n = name.removeprefix("transformer.")
        n = n.replace(".attn.", ".").replace(".mlp.c_proj.", ".mlp_c_proj.").replace(".mlp.", ".")
        if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        out[n] = t
    return out


def build(config, state) -> Gpt2Decoder:
    args = Gpt2Args.from_config(config)
    from .llama import _load

    return _load(Gpt2Decoder(args), hf_to_ours(state, args))
