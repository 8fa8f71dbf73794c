"""The llama-like decoder every RMSNorm/rotary family shares, with each family's twist as data
(DecoderArgs), in the plain graph (fused.py builds the fused one from the same args and weights):

x = embed(ids) * embed_scale
per layer:  h = n1(x)                                  (olmo2: no pre-norms, h = x)
            q, k, v = q(h), k(h), v(h)                 qk_norm "proj": q, k normed over the whole projection
            q, k per head: normed ("head"), rotated (rope: the layer's rotary, None: NoPE)
            a = o(softcap(q·kᵀ · attn_scale) + mask over the layer's window) · v)
            x += attn_out_norm(a) · residual_scale     (attn_out_norm: gemma2/3, olmo2)
            m = down(act(gate(n2(x))) * up(n2(x)))
            x += mlp_out_norm(m) · residual_scale
logits = softcap(head(norm(x)) / logits_divisor)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .common import (
    RMSNorm,
    Rotary,
    attend,
    causal_mask,
    load_state,
    merge_heads,
    output_head,
    rotary_from_config,
    split_heads,
)

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass
class DecoderArgs:
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
    sliding_window: int | None = None  # every layer's, unless layer_windows says otherwise
    layer_windows: tuple[int | None, ...] | None = None
    layer_rope: tuple[str | None, ...] | None = None  # per layer: "global", "local" or None (no rotary)
    act: str = "silu"  # "silu" or "gelu_tanh"
    qk_norm: str | None = None  # "head" (over head_dim) or "proj" (over the whole projection)
    pre_norms: bool = True
    post_norms: bool = False
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_softcap: float | None = None
    logits_divisor: float = 1.0
    final_softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> DecoderArgs:
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"{config.model_type}: hidden_act {act!r} is not exported")
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
            act=ACTIVATIONS[act],
        )

    def windows(self) -> list[int | None]:
        return list(self.layer_windows or [self.sliding_window] * self.num_layers)

    def ropes(self) -> list[str | None]:
        return list(self.layer_rope or ["global"] * self.num_layers)


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(config) -> list[str] | None:
    """config.layer_types, refusing a kind of attention layer we do not build (chunked, linear, ...)."""
    types = getattr(config, "layer_types", None)
    unknown = sorted(set(types or ()) - set(LAYER_TYPES))
    if unknown:
        raise NotImplementedError(
            f"{config.model_type}: layer_types {', '.join(map(repr, unknown))} are not exported"
        )
    return list(types) if types else None


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Block(nn.Module):
    def __init__(self, a: DecoderArgs):
        super().__init__()
        self.a = a
        if a.pre_norms:
            self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm is not None:
            per_head = a.qk_norm == "head"
            self.q_norm = RMSNorm(a.head_dim if per_head else a.num_heads * a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim if per_head else a.num_kv_heads * a.head_dim, a.rms_norm_eps)
        if a.pre_norms:
            self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)  # before the MLP
        if a.post_norms:
            self.attn_out_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
            self.mlp_out_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def _residual(self, x, y):
        return x + (y * self.a.residual_scale if self.a.residual_scale != 1.0 else y)

    def forward(self, x, cos_sin, mask, rotary, past_k, past_v):
        a = self.a
        h = self.input_layernorm(x) if a.pre_norms else x
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if a.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = split_heads(q, a.num_heads, a.head_dim)  # (batch, heads, seq, d)
        k = split_heads(k, a.num_kv_heads, a.head_dim)  # (batch, kv_heads, seq, d)
        v = split_heads(v, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary.apply(q, *cos_sin), rotary.apply(k, *cos_sin)
        k = torch.cat((past_k, k), dim=2)  # (batch, kv_heads, total, d)
        v = torch.cat((past_v, v), dim=2)
        attn = self.o_proj(merge_heads(attend(q, k, v, mask, a.attn_scale, a.attn_softcap)))
        x = self._residual(x, self.attn_out_norm(attn) if a.post_norms else attn)
        h = self.post_attention_layernorm(x) if a.pre_norms else x
        m = self.down_proj(activation(a.act, self.gate_proj(h)) * self.up_proj(h))
        return self._residual(x, self.mlp_out_norm(m) if a.post_norms else m), k, v


def long_rope_after(rotaries: dict[str, Rotary]) -> int | None:
    """The length past which a row takes the long factors (the graph then has a long_rope input), or None
    when no rotary is longrope."""
    originals = {r.extra["original"] for r in rotaries.values() if r.kind == "longrope"}
    if len(originals) > 1:
        raise NotImplementedError(f"longrope rotaries switching at different lengths {sorted(originals)}")
    return originals.pop() if originals else None


def dynamic_rope_from(rotaries: dict[str, Rotary]) -> int | None:
    """Dynamic NTK: the length past which a call rotates every token with the scaling of the batch's
    longest sequence (transformers' semantic), so a several-token call there computes differently from
    one token a call (the runtime's speculation stays below it); None without a dynamic rotary."""
    lengths = [r.extra["max_pos"] for r in rotaries.values() if r.kind == "dynamic"]
    return min(lengths) if lengths else None


def split_long_rope(past: tuple, num_layers: int, long_rope):
    """(the KV tensors, long_rope): the exporter passes long_rope after the KV tensors, positionally (the
    TorchScript exporter makes no graph input of a keyword argument)."""
    if long_rope is None and len(past) == 2 * num_layers + 1:
        return past[:-1], past[-1]
    return past, long_rope


class Decoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past, long_rope=None) -> (logits, *present).

    long_rope (batch,) int64, a graph input only where a rotary is longrope (`long_rope_after` set): 1 for a
    row that rotates with the long factors."""

    uses_position_ids = True

    def __init__(self, a: DecoderArgs, rotaries: dict[str, Rotary]):
        super().__init__()
        self.a = a
        self.long_rope_after = long_rope_after(rotaries)
        self.dynamic_rope_from = dynamic_rope_from(rotaries)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotaries = nn.ModuleDict(rotaries)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past, long_rope=None):
        past, long_rope = split_long_rope(past, self.a.num_layers, long_rope)
        a = self.a
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        if a.embed_scale != 1.0:
            x = x * a.embed_scale
        seq = input_ids.shape[1]
        windows, ropes = a.windows(), a.ropes()
        masks = {w: causal_mask(attention_mask, seq, x.dtype, w) for w in set(windows)}
        cos_sin = {name: r.cos_sin(position_ids, long_rope) for name, r in self.rotaries.items()}
        presents = []
        for i, layer in enumerate(self.layers):
            r = ropes[i]
            rotary, cs = (self.rotaries[r], cos_sin[r]) if r else (None, None)
            x, k, v = layer(x, cs, masks[windows[i]], rotary, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        head = self.embed_tokens.weight if a.tie_word_embeddings else self.lm_head.weight
        logits = output_head(self.norm(x), head)
        if a.logits_divisor != 1.0:
            logits = logits / a.logits_divisor
        return (softcap(logits, a.final_softcap), *presents)


def global_rotary(config, a: DecoderArgs) -> dict[str, Rotary]:
    return {"global": rotary_from_config(config, a.head_dim)}


def hf_to_ours(state: dict[str, torch.Tensor], a: DecoderArgs, renames: dict[str, str] | None = None):
    """A transformers llama-like state dict under this module's names; `renames` maps a family's norm
    names (the last dotted part before .weight) to ours."""
    out = {}
    for name, t in state.items():
        if "rotary_emb" in name:  # inv_freq buffers (gemma3 has a local one too)
            continue
        n = name.removeprefix("model.")
        n = n.replace("self_attn.", "").replace("mlp.", "")
        if n == "lm_head.weight" and a.tie_word_embeddings:
            continue
        out[".".join((renames or {}).get(part, part) for part in n.split("."))] = t
    return out


def build_plain(a: DecoderArgs, rotaries: dict[str, Rotary], tensors: dict[str, torch.Tensor]) -> Decoder:
    module = Decoder(a, rotaries)
    load_state(module, tensors)
    return module.eval()
