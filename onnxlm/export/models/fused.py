"""The fused graph of the llama-like families: onnxruntime's contrib operators over a shared KV buffer.

Each piece is a torch.autograd.Function whose `forward` is the eager math (the reference, proven equal
to transformers by the parity tests) and whose `symbolic` emits the fused operator, so the
TorchScript exporter writes one node where the plain graph has a dozen:

    x = embed(ids)                                             (batch, seq, hidden)
    h = SimplifiedLayerNormalization(x)                        input_layernorm of layer 0
    per layer:
        a = o(GroupQueryAttention(qkv(h), past_k, past_v, ...))   rotary inside, present == past buffer
        h, x = SkipSimplifiedLayerNormalization(a, x)          x += a; h = post_attention_layernorm(x)
        m = down(silu(gate(h)) * up(h))                        onnxruntime fuses silu into QuickGelu
        h, x = SkipSimplifiedLayerNormalization(m, x)          x += m; h = next layer's input_layernorm(x)
    logits = head(norm(gather(x, logits_index)))               only the positions asked for

Merged gate|up would save no node here (com.microsoft SwiGLU, which could take it whole, has no CPU
kernel; a Split costs what the second MatMul saves), and separate gate/up keep their names for the
per-projection quantization recipes and GGUF block mapping.

KV buffers are (batch, kv_heads, capacity, head_dim); the runtime picks the capacity, binds one buffer as
both past and present, and says per row how many tokens the buffer holds after the step
(seqlens_k + 1) and how many of this chunk's rows are real (query_seqlens: chunks are right-padded).
Query row s of entry b sits at position seqlens_k[b] + 1 - query_seqlens[b] + s.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.onnx import symbolic_helper

from .common import Rotary, output_head


def _none(g):
    return symbolic_helper._optional_input_placeholder_tensor(g)  # an empty ("") optional input


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary over the first 2*cos.shape[-1] channels. x (heads, seq, d); cos, sin (seq, rot/2)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class GroupQueryAttention(torch.autograd.Function):
    """com.microsoft GroupQueryAttention, packed q|k|v in, past/present sharing one buffer.

    qkv (batch, seq, (heads + 2 kv_heads) * d); past_k, past_v (batch, kv_heads, capacity, d);
    seqlens_k, query_seqlens (batch,) int32; total_sequence_length () int32; cos, sin (context, rot/2).
    Returns (batch, seq, heads * d) and the buffers with this chunk's keys/values written in.
    """

    @staticmethod
    def forward(
        ctx, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, query_seqlens, heads, kv_heads, window
    ):
        batch, seq, _ = qkv.shape
        d = past_k.shape[-1]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.reshape(batch, seq, heads, d).transpose(1, 2)  # (batch, heads, seq, d)
        k = k.reshape(batch, seq, kv_heads, d).transpose(1, 2)  # (batch, kv_heads, seq, d)
        v = v.reshape(batch, seq, kv_heads, d).transpose(1, 2)
        present_k, present_v = past_k.clone(), past_v.clone()
        out = torch.zeros(batch, heads, seq, d, dtype=qkv.dtype)
        group = heads // kv_heads
        for b in range(batch):
            total, n = int(seqlens_k[b]) + 1, int(query_seqlens[b])
            start = total - n  # tokens cached before this chunk
            if n == 0:
                continue
            pos = torch.arange(start, total)
            present_k[b, :, start:total] = _rope(k[b, :, :n], cos[pos], sin[pos])
            present_v[b, :, start:total] = v[b, :, :n]
            keys = present_k[b, :, :total].repeat_interleave(group, dim=0)  # (heads, total, d)
            values = present_v[b, :, :total].repeat_interleave(group, dim=0)
            scores = _rope(q[b, :, :n], cos[pos], sin[pos]) @ keys.transpose(-1, -2) / math.sqrt(d)
            k_pos = torch.arange(total)[None, :]  # (1, total)
            allowed = k_pos <= pos[:, None]  # (n, total)
            if window >= 0:
                allowed = allowed & (pos[:, None] - k_pos < window)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, :, :n] = torch.softmax(scores, dim=-1) @ values
        return out.transpose(1, 2).reshape(batch, seq, heads * d), present_k, present_v

    @staticmethod
    def symbolic(
        g, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, query_seqlens, heads, kv_heads, window
    ):
        none = _none(g)
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv, none, none, past_k, past_v, seqlens_k, total_len, cos, sin,
            none, none, none, none, none, none, none, query_seqlens,  # position_ids .. k_norm_weight unused
            num_heads_i=heads,
            kv_num_heads_i=kv_heads,
            do_rotary_i=1,
            local_window_size_i=window,
            outputs=3,
        )  # fmt: skip
        out.setType(qkv.type().with_sizes([None, None, None]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class RMSNormOp(torch.autograd.Function):
    """SimplifiedLayerNormalization: w * x / sqrt(mean(x^2) + eps) over the last axis."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def symbolic(g, x, weight, eps):
        y = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        y.setType(x.type())
        return y


class SkipRMSNormOp(torch.autograd.Function):
    """com.microsoft SkipSimplifiedLayerNormalization: s = x + skip; returns (rmsnorm(s), s)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        s = x + skip
        return weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)), s

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        y, _, _, s = g.op(
            "com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps, outputs=4
        )
        y.setType(x.type())
        s.setType(x.type())
        return y, s


def rotary_caches(rotary: Rotary, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (context, rotary_dim / 2) from the same inv_freq and scaling as common.Rotary."""
    freqs = torch.arange(context).float().unsqueeze(-1) * rotary.inv_freq  # (context, rot/2)
    return freqs.cos() * rotary.scaling, freqs.sin() * rotary.scaling


class FusedBlock(nn.Module):
    def __init__(self, a, window: int | None):
        super().__init__()
        self.a = a
        self.window = -1 if window is None else window  # keys visible to a query, itself included
        self.input_layernorm = nn.Parameter(torch.ones(a.hidden_size))
        qkv_rows = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, qkv_rows, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        self.post_attention_layernorm = nn.Parameter(torch.ones(a.hidden_size))
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, h, x, kv, past_k, past_v):
        """h: this layer's normed input, x: the residual stream (batch, seq, hidden). Returns the MLP
        output (not yet added), the residual, and the buffers."""
        a = self.a
        seqlens_k, total, query_seqlens, cos, sin = kv
        attn, k, v = GroupQueryAttention.apply(
            self.qkv_proj(h), past_k, past_v, seqlens_k, total, cos, sin, query_seqlens,
            a.num_heads, a.num_kv_heads, self.window,
        )  # fmt: skip
        h, x = SkipRMSNormOp.apply(self.o_proj(attn), x, self.post_attention_layernorm, a.rms_norm_eps)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), x, k, v


class FusedDecoder(nn.Module):
    """forward(input_ids, seqlens_k, total_sequence_length, query_seqlens, logits_index, *past)
    -> (logits (batch, len(logits_index[0]), vocab), *present)."""

    uses_position_ids = False
    graph = "fused"

    def __init__(self, a, rotary: Rotary, context: int, windows: list[int | None]):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(FusedBlock(a, w) for w in windows)
        self.norm = nn.Parameter(torch.ones(a.hidden_size))
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        cos, sin = rotary_caches(rotary, context)
        self.register_buffer("cos_cache", cos)
        self.register_buffer("sin_cache", sin)
        # how to recompute the caches inside the graph (see convert.rotary_caches_in_graph)
        self.rotary_spec = (rotary.inv_freq.float().numpy().copy(), float(rotary.scaling), context)

    def forward(self, input_ids, seqlens_k, total_sequence_length, query_seqlens, logits_index, *past):
        a = self.a
        kv = (seqlens_k, total_sequence_length, query_seqlens, self.cos_cache, self.sin_cache)
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        h = RMSNormOp.apply(x, self.layers[0].input_layernorm, a.rms_norm_eps)
        presents = []
        for i, layer in enumerate(self.layers):
            m, x, k, v = layer(h, x, kv, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if i + 1 < len(self.layers):
                h, x = SkipRMSNormOp.apply(m, x, self.layers[i + 1].input_layernorm, a.rms_norm_eps)
        x = x + m
        index = logits_index.unsqueeze(-1).expand(-1, -1, a.hidden_size)  # (batch, n, hidden)
        x = RMSNormOp.apply(torch.gather(x, 1, index), self.norm, a.rms_norm_eps)  # (batch, n, hidden)
        head = self.embed_tokens.weight if a.tie_word_embeddings else self.lm_head.weight
        return (output_head(x, head), *presents)


def fused_state(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The plain module's names -> the fused module's: q|k|v concatenated by rows (qkv_proj), norms as
    bare parameters."""
    out = dict(tensors)
    for i in range(num_layers):
        p = f"layers.{i}."
        for part in ("weight", "bias"):
            qkv = [out.pop(f"{p}{n}_proj.{part}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"{p}qkv_proj.{part}"] = torch.cat(qkv, dim=0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm] = out.pop(f"{p}{norm}.weight")
    out["norm"] = out.pop("norm.weight")
    return out


def build(
    a, config, tensors: dict[str, torch.Tensor], windows: list[int | None], context: int
) -> FusedDecoder:
    """The fused decoder from the plain module's weights (`tensors`, the plain module's names).

    Raises NotImplementedError for what GroupQueryAttention cannot do (the caller keeps the plain graph)."""
    from .common import load_state, rotary_from_config

    rotary = rotary_from_config(config, a.head_dim)
    half = rotary.rotary_dim // 2
    if half % 8 or rotary.rotary_dim > a.head_dim:
        raise NotImplementedError(
            f"rotary over {rotary.rotary_dim} of {a.head_dim} channels: GroupQueryAttention's cos/sin caches "
            "need a multiple of 8 columns (rotary_dim a multiple of 16)"
        )
    if a.head_dim % 8 or a.num_heads % a.num_kv_heads:
        raise NotImplementedError(
            f"head size {a.head_dim} (GroupQueryAttention wants a multiple of 8), "
            f"{a.num_heads} query heads over {a.num_kv_heads} KV heads"
        )
    module = FusedDecoder(a, rotary, context, windows)
    load_state(module, fused_state(tensors, a.num_layers))
    return module.eval()
