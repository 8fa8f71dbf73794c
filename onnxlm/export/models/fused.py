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

The families' twists (decoder.DecoderArgs) change this picture in place: q/k norms split q|k|v and norm
q and k (SimplifiedLayerNormalization per head or over the projection) before a GroupQueryAttention that
takes them apart; attention scale and soft-cap, windows and do_rotary=0 (NoPE) are its attributes, a
gemma3 local layer reads cos_cache_local; post norms (gemma, olmo2) norm `a` and `m` before the add, which
then fuses into the next norm's SkipSimplifiedLayerNormalization (olmo2 has no pre-norms: plain Adds);
Granite's multipliers are Muls on the embedding and each residual addend, a Div on the logits.

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
from torch.onnx import symbolic_helper

from .common import Rotary, output_head
from .decoder import activation, dynamic_rope_from, long_rope_after, softcap, split_long_rope


def _none(g):
    return symbolic_helper._optional_input_placeholder_tensor(g)  # an empty ("") optional input


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary over the first 2*cos.shape[-1] channels. x (heads, seq, d); cos, sin (seq, rot/2)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class GroupQueryAttention(torch.autograd.Function):
    """com.microsoft GroupQueryAttention, past/present sharing one buffer.

    qkv packed (batch, seq, (heads + 2 kv_heads) * d) with k, v None, or q, k, v apart (after q/k norms);
    past_k, past_v (batch, kv_heads, capacity, d); seqlens_k, query_seqlens (batch,) int32;
    total_sequence_length () int32; cos, sin (context, rot/2), None for a layer without rotary (NoPE).
    scale None: 1/sqrt(d); softcap: scores become cap·tanh(scores/cap) before the mask.
    Returns (batch, seq, heads * d) and the buffers with this chunk's keys/values written in.
    """

    @staticmethod
    def forward(
        ctx, qkv, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, query_seqlens,
        heads, kv_heads, window, scale, softcap,
    ):  # fmt: skip
        batch, seq, _ = qkv.shape
        d = past_k.shape[-1]
        if k is None:  # packed q|k|v
            q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        else:
            q = qkv
        q = q.reshape(batch, seq, heads, d).transpose(1, 2)  # (batch, heads, seq, d)
        k = k.reshape(batch, seq, kv_heads, d).transpose(1, 2)  # (batch, kv_heads, seq, d)
        v = v.reshape(batch, seq, kv_heads, d).transpose(1, 2)
        present_k, present_v = past_k.clone(), past_v.clone()
        out = torch.zeros(batch, heads, seq, d, dtype=qkv.dtype)
        group = heads // kv_heads
        scale = scale if scale is not None else 1 / math.sqrt(d)

        def rope(x, pos):
            return x if cos is None else _rope(x, cos[pos], sin[pos])

        for b in range(batch):
            total, n = int(seqlens_k[b]) + 1, int(query_seqlens[b])
            start = total - n  # tokens cached before this chunk
            if n == 0:
                continue
            pos = torch.arange(start, total)
            present_k[b, :, start:total] = rope(k[b, :, :n], pos)
            present_v[b, :, start:total] = v[b, :, :n]
            keys = present_k[b, :, :total].repeat_interleave(group, dim=0)  # (heads, total, d)
            values = present_v[b, :, :total].repeat_interleave(group, dim=0)
            scores = rope(q[b, :, :n], pos) @ keys.transpose(-1, -2) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            k_pos = torch.arange(total)[None, :]  # (1, total)
            allowed = k_pos <= pos[:, None]  # (n, total)
            if window >= 0:
                allowed = allowed & (pos[:, None] - k_pos < window)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, :, :n] = torch.softmax(scores, dim=-1) @ values
        return out.transpose(1, 2).reshape(batch, seq, heads * d), present_k, present_v

    @staticmethod
    def symbolic(
        g, qkv, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, query_seqlens,
        heads, kv_heads, window, scale, softcap,
    ):  # fmt: skip
        none = _none(g)
        extra = {}
        if scale is not None:
            extra["scale_f"] = scale
        if softcap is not None:
            extra["softcap_f"] = softcap
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv, none if k is None else k, none if v is None else v, past_k, past_v, seqlens_k, total_len,
            none if cos is None else cos, none if sin is None else sin,
            none, none, none, none, none, none, none, query_seqlens,  # position_ids .. k_norm_weight unused
            num_heads_i=heads,
            kv_num_heads_i=kv_heads,
            do_rotary_i=int(cos is not None),
            local_window_size_i=window,
            outputs=3,
            **extra,
        )  # fmt: skip
        out.setType(qkv.type().with_sizes([None, None, None]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class RotaryOp(torch.autograd.Function):
    """com.microsoft RotaryEmbedding (half-split) of x (batch, seq, heads * d) at positions pos (batch, seq)
    int64, over the first `rot` channels of each head: for a rotary chosen per row (longrope), whose rows
    index one cos/sin cache of short then long entries, where GroupQueryAttention reads one cache for all."""

    @staticmethod
    def forward(ctx, x, pos, cos, sin, heads, rot, d):
        batch, seq, _ = x.shape
        heads_x = x.reshape(batch, seq, heads, -1)  # (batch, seq, heads, d)
        c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)  # (batch, seq, 1, rot/2)
        return _rope(heads_x, c, s).reshape(batch, seq, -1)

    @staticmethod
    def symbolic(g, x, pos, cos, sin, heads, rot, d):
        partial = {} if d == rot else {"rotary_embedding_dim_i": rot}
        y = g.op(
            "com.microsoft::RotaryEmbedding", x, pos, cos, sin, num_heads_i=heads, interleaved_i=0, **partial
        )
        y.setType(x.type())
        return y


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


def ones(n: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(n))


class FusedBlock(nn.Module):
    def __init__(self, a, window: int | None, rope: str | None):
        super().__init__()
        self.a = a
        self.window = -1 if window is None else window  # keys visible to a query, itself included
        self.rope = rope  # "global", "local" or None (no rotary)
        if a.pre_norms:
            self.input_layernorm, self.post_attention_layernorm = ones(a.hidden_size), ones(a.hidden_size)
        if a.post_norms:
            self.attn_out_norm, self.mlp_out_norm = ones(a.hidden_size), ones(a.hidden_size)
        if a.qk_norm is not None:
            per_head = a.qk_norm == "head"
            self.q_norm = ones(a.head_dim if per_head else a.num_heads * a.head_dim)
            self.k_norm = ones(a.head_dim if per_head else a.num_kv_heads * a.head_dim)
        qkv_rows = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, qkv_rows, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        # gate and up read the same input: one weight of 2·intermediate rows, one MatMul (and one quantized
        # node with one block-sum input under scheme min) instead of two, then a Split; a SmolLM2 int4 step
        # measured 2-6% faster, outputs bitwise equal
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def _qk_normed(self, qkv):
        """q, k, v apart with q and k RMS-normed, per head or over the whole projection."""
        a = self.a
        q, k, v = qkv.split(
            [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim], -1
        )
        if a.qk_norm == "proj":
            return (
                RMSNormOp.apply(q, self.q_norm, a.rms_norm_eps),
                RMSNormOp.apply(k, self.k_norm, a.rms_norm_eps),
                v,
            )
        batch, seq = qkv.shape[0], qkv.shape[1]
        q = RMSNormOp.apply(q.reshape(batch, seq, a.num_heads, a.head_dim), self.q_norm, a.rms_norm_eps)
        k = RMSNormOp.apply(k.reshape(batch, seq, a.num_kv_heads, a.head_dim), self.k_norm, a.rms_norm_eps)
        return q.reshape(batch, seq, -1), k.reshape(batch, seq, -1), v

    def attention(self, h, kv, caches, past_k, past_v):
        """o_proj(attention) of this layer's normed input h (batch, seq, hidden), and the buffers."""
        a = self.a
        seqlens_k, total, query_seqlens = kv
        cos, sin, per_row = caches[self.rope] if self.rope else (None, None, None)
        qkv = self.qkv_proj(h)
        q, k, v = self._qk_normed(qkv) if a.qk_norm else (qkv, None, None)
        if per_row is not None:  # rotary chosen per row: q and k rotate here, GroupQueryAttention does not
            pos, rot = per_row
            if k is None:
                q, k, v = qkv.split(
                    [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim], -1
                )
            q = RotaryOp.apply(q, pos, cos, sin, a.num_heads, rot, a.head_dim)
            k = RotaryOp.apply(k, pos, cos, sin, a.num_kv_heads, rot, a.head_dim)
            cos = sin = None
        attn, k, v = GroupQueryAttention.apply(
            q, k, v, past_k, past_v, seqlens_k, total, cos, sin, query_seqlens,
            a.num_heads, a.num_kv_heads, self.window, a.attn_scale, a.attn_softcap,
        )  # fmt: skip
        return self.o_proj(attn), k, v

    def _norm(self, x, pending, weight):
        """norm(x + pending) and the new residual (pending None: norm(x), x unchanged)."""
        if pending is None:
            return RMSNormOp.apply(x, weight, self.a.rms_norm_eps), x
        return SkipRMSNormOp.apply(pending, x, weight, self.a.rms_norm_eps)

    def _scaled(self, y):
        return y * self.a.residual_scale if self.a.residual_scale != 1.0 else y

    def forward(self, x, pending, kv, caches, past_k, past_v):
        """x: the residual stream (batch, seq, hidden) without `pending`, the previous layer's addend
        (None before the first layer). Returns the residual, this layer's addend, and the buffers."""
        a = self.a
        if a.pre_norms:
            h, x = self._norm(x, pending, self.input_layernorm)
        else:
            x = x if pending is None else x + pending
            h = x
        attn, k, v = self.attention(h, kv, caches, past_k, past_v)
        if a.post_norms:
            attn = RMSNormOp.apply(attn, self.attn_out_norm, a.rms_norm_eps)
        if a.pre_norms:
            h, x = self._norm(x, self._scaled(attn), self.post_attention_layernorm)
        else:
            x = x + self._scaled(attn)
            h = x
        gate, up = self.gate_up_proj(h).split([a.intermediate_size, a.intermediate_size], -1)
        m = self.down_proj(activation(a.act, gate) * up)
        if a.post_norms:
            m = RMSNormOp.apply(m, self.mlp_out_norm, a.rms_norm_eps)
        return x, self._scaled(m), k, v


class FusedDecoder(nn.Module):
    """forward(input_ids, seqlens_k, total_sequence_length, query_seqlens, logits_index, *past,
    long_rope=None) -> (logits (batch, len(logits_index[0]), vocab), *present).

    A residual addend waits in `pending` until the next norm, so that add and norm fuse into one
    SkipSimplifiedLayerNormalization wherever the family has a norm there.

    A longrope rotary is chosen per row (long_rope (batch,) 1: the long factors; a graph input only then):
    its cos/sin cache holds the short entries then the long ones, and RotaryEmbedding nodes rotate q and
    k at position + context on long rows, since GroupQueryAttention reads one cache for the whole batch."""

    uses_position_ids = False
    graph = "fused"

    def __init__(self, a, rotaries: dict[str, Rotary], context: int):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(FusedBlock(a, w, r) for w, r in zip(a.windows(), a.ropes(), strict=True))
        self.norm = nn.Parameter(torch.ones(a.hidden_size))
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.context = context
        self.long_rope_after = long_rope_after(rotaries)
        self.dynamic_rope_from = dynamic_rope_from(rotaries)
        self.longrope: dict[str, int] = {}  # rotaries chosen per row (their caches: short then long) -> width
        self.dynamic: dict[str, Rotary] = {}  # rotaries whose caches are computed at each step
        caches = {}  # cache name suffix -> [(inv_freq, scaling)] segments: how to recompute them in the graph
        for name, rotary in rotaries.items():
            suffix = "" if name == "global" else f"_{name}"
            if rotary.kind == "dynamic":
                self.dynamic[name] = rotary
                continue
            caches[suffix] = [(rotary.inv_freq, rotary.scaling)]
            if rotary.kind == "longrope":
                self.longrope[name] = rotary.rotary_dim
                caches[suffix].append((rotary.long_inv_freq, rotary.scaling))
        for suffix, segments in caches.items():
            freqs = [
                torch.arange(context).float().unsqueeze(-1) * inv for inv, _ in segments
            ]  # (context, rot/2)
            scaled = [(f, scaling) for f, (_, scaling) in zip(freqs, segments, strict=True)]
            self.register_buffer(f"cos_cache{suffix}", torch.cat([f.cos() * sc for f, sc in scaled]))
            self.register_buffer(f"sin_cache{suffix}", torch.cat([f.sin() * sc for f, sc in scaled]))
        # see convert.rotary_caches_in_graph
        self.rotary_spec = (
            {k: [(inv.float().numpy().copy(), float(sc)) for inv, sc in v] for k, v in caches.items()},
            context,
        )

    def _positions(self, input_ids, seqlens_k, query_seqlens, long_rope):
        """(batch, seq) int64: each chunk position's index into a short-then-long cache. Query s of row b
        sits at seqlens_k[b] + 1 - query_seqlens[b] + s (clipped: a padded one may run past the context),
        context entries further on a long row. Without long_rope a row is long once it holds more than
        the original length after this step (its own length, never its batchmates')."""
        start = (seqlens_k + 1 - query_seqlens).long()  # (batch,)
        pos = start.unsqueeze(1) + torch.arange(input_ids.shape[1]).unsqueeze(0)  # (batch, seq)
        pos = torch.clamp(pos, 0, self.context - 1)
        if long_rope is None:
            long_rope = (seqlens_k + 1 > self.long_rope_after).long()
        return pos + long_rope.long().unsqueeze(1) * self.context

    def _caches(self, seqlens_k, capacity: int, pos):
        """name -> (cos, sin, per_row) of each rotary: per_row None where GroupQueryAttention rotates with
        the caches itself, a longrope rotary's (cache index per query (see _positions), width). A dynamic
        one computes its caches over the buffer's capacity from the NTK inv_freq of the batch's longest
        row (as transformers decides per forward)."""
        out = {}
        longest = seqlens_k.max() + 1  # () tokens the batch's longest row holds after this step
        for name, rotary in self.dynamic.items():
            freqs = torch.arange(capacity).float().unsqueeze(-1) * rotary.inv_freq_for(
                longest
            )  # (cap, rot/2)
            out[name] = (freqs.cos() * rotary.scaling, freqs.sin() * rotary.scaling, None)
        for name in ("global", "local"):
            suffix = "" if name == "global" else f"_{name}"
            if hasattr(self, f"cos_cache{suffix}"):
                cos, sin = getattr(self, f"cos_cache{suffix}"), getattr(self, f"sin_cache{suffix}")
                out[name] = (cos, sin, (pos, self.longrope[name]) if name in self.longrope else None)
        return out

    def forward(
        self, input_ids, seqlens_k, total_sequence_length, query_seqlens, logits_index, *past, long_rope=None
    ):
        past, long_rope = split_long_rope(past, self.a.num_layers, long_rope)
        a = self.a
        kv = (seqlens_k, total_sequence_length, query_seqlens)
        pos = self._positions(input_ids, seqlens_k, query_seqlens, long_rope) if self.longrope else None
        caches = self._caches(seqlens_k, past[0].shape[2], pos)
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        if a.embed_scale != 1.0:
            x = x * a.embed_scale
        pending, presents = None, []  # pending: the addend not yet in the residual x
        for i, layer in enumerate(self.layers):
            x, pending, k, v = layer(x, pending, kv, caches, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = x + pending
        index = logits_index.unsqueeze(-1).expand(-1, -1, a.hidden_size)  # (batch, n, hidden)
        x = RMSNormOp.apply(torch.gather(x, 1, index), self.norm, a.rms_norm_eps)  # (batch, n, hidden)
        head = self.embed_tokens.weight if a.tie_word_embeddings else self.lm_head.weight
        logits = output_head(x, head)
        if a.logits_divisor != 1.0:
            logits = logits / a.logits_divisor
        return (softcap(logits, a.final_softcap), *presents)


def fused_state(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The plain module's names -> the fused module's: q|k|v concatenated by rows (qkv_proj), gate|up
    too (gate_up_proj), norms as bare parameters."""
    out = dict(tensors)
    for i in range(num_layers):
        p = f"layers.{i}."
        for part in ("weight", "bias"):
            for fused, parts in (("qkv", "qkv"), ("gate_up", ("gate", "up"))):
                stacked = [out.pop(f"{p}{n}_proj.{part}", None) for n in parts]
                if all(t is not None for t in stacked):
                    out[f"{p}{fused}_proj.{part}"] = torch.cat(stacked, dim=0)
    for name in [n for n in out if n.endswith("norm.weight")]:
        out[name.removesuffix(".weight")] = out.pop(name)
    return out


def build(a, rotaries: dict[str, Rotary], tensors: dict[str, torch.Tensor], context: int) -> FusedDecoder:
    """The fused decoder from the plain module's weights (`tensors`, the plain module's names).

    Raises NotImplementedError for what GroupQueryAttention cannot do (the caller keeps the plain graph)."""
    from .common import load_state

    for name, rotary in rotaries.items():
        if rotary.kind == "dynamic" and rotary.rotary_dim != a.head_dim:
            raise NotImplementedError(
                "dynamic rotary over part of the head: the long-context decode branch reads the rotary "
                "width from a cache the fused graph computes each step"
            )
        half = rotary.rotary_dim // 2
        if half % 8 or rotary.rotary_dim > a.head_dim:
            raise NotImplementedError(
                f"{name} rotary over {rotary.rotary_dim} of {a.head_dim} channels: GroupQueryAttention's "
                "cos/sin caches need a multiple of 8 columns (rotary_dim a multiple of 16)"
            )
    if a.head_dim % 8 or a.num_heads % a.num_kv_heads:
        raise NotImplementedError(
            f"head size {a.head_dim} (GroupQueryAttention wants a multiple of 8), "
            f"{a.num_heads} query heads over {a.num_kv_heads} KV heads"
        )
    module = FusedDecoder(a, rotaries, context)
    load_state(module, fused_state(tensors, a.num_layers))
    return module.eval()
