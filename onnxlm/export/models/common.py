"""Pieces shared by the family modules: masks, rotary embedding, attention, tied output head.

Every module takes explicit past KV tensors and returns the present ones (gpt-fast style), so the
traced graph has no cache objects: (batch, kv_heads, seq, head_dim) in, the same with seq grown out.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .rope import dynamic_inv_freq


def causal_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype, window: int | None = None):
    """Additive mask (batch, 1, seq, total) from the padding mask (batch, total).

    Query i sits at absolute slot past + i, where past = total - seq; it may see slot j when j <= past + i,
    the slot is not padding, and (with a sliding window) fewer than `window` tokens lie between them,
    counted over the mask's real slots: the runtime leaves rejected speculative drafts as holes in the
    mask, so slots are not token distances.
    """
    total = attention_mask.shape[1]
    past = total - seq
    q_pos = torch.arange(seq, device=attention_mask.device).unsqueeze(1) + past  # (seq, 1)
    k_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # (1, total)
    allowed = (k_pos <= q_pos).unsqueeze(0)  # (1, seq, total)
    if window is not None:
        held = attention_mask.long().cumsum(-1)  # (batch, total): real tokens up to each slot
        allowed = allowed & (held[:, past:].unsqueeze(-1) - held.unsqueeze(1) < window)
    allowed = allowed.unsqueeze(1) & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)  # (batch, 1, seq, total)


class Rotary(nn.Module):
    """Rotary position embedding over the first `rotary_dim` channels (half-split layout).

    kind "fixed": one inv_freq; "dynamic": NTK inv_freq of the batch's longest sequence at each forward;
    "longrope": short inv_freq up to `original` tokens, long past it, chosen per row (see rope.py)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0, kind: str = "fixed", **extra):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = scaling
        self.rotary_dim = inv_freq.shape[0] * 2
        self.kind = kind
        self.extra = extra  # dynamic: base, factor, max_pos; longrope: long_inv_freq, original
        if kind == "longrope":
            self.register_buffer("long_inv_freq", extra.pop("long_inv_freq").float(), persistent=False)

    def inv_freq_for(self, seq_len: torch.Tensor) -> torch.Tensor:
        """inv_freq (rot/2,) for a forward whose longest sequence holds `seq_len` tokens (0-d)."""
        if self.kind == "dynamic":
            e = self.extra
            return dynamic_inv_freq(seq_len, e["base"], self.rotary_dim, e["factor"], e["max_pos"])
        if self.kind == "longrope":
            return torch.where(seq_len > self.extra["original"], self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def row_inv_freq(self, long_rows: torch.Tensor) -> torch.Tensor:
        """longrope: each row's inv_freq (batch, 1, rot/2), the long one where long_rows (batch,) is 1."""
        pick = long_rows.reshape(-1, 1, 1) > 0
        return torch.where(pick, self.long_inv_freq, self.inv_freq)

    def cos_sin(self, position_ids: torch.Tensor, long_rows: torch.Tensor | None = None):
        """cos, sin (batch, 1, seq, rot) at position_ids (batch, seq). A longrope rotary takes its factors per
        row: long where long_rows (batch,) is 1 (the runtime's choice, see the manifest's io.long_rope), or
        without long_rows where the row's own positions pass the original length (never its batchmates')."""
        if self.kind == "longrope":
            if long_rows is None:
                long_rows = (position_ids.max(dim=1).values + 1 > self.extra["original"]).long()
            inv_freq = self.row_inv_freq(long_rows)
        elif self.kind == "dynamic":
            inv_freq = self.inv_freq_for(position_ids.max() + 1)
        else:
            inv_freq = self.inv_freq
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (batch, seq, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, rot)
        cos = (emb.cos() * self.scaling).unsqueeze(1)  # (batch, 1, seq, rot)
        sin = (emb.sin() * self.scaling).unsqueeze(1)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]  # (batch, heads, seq, *)
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rotary_from_config(
    config, head_dim: int, params: dict | None = None, layer_type: str | None = None
) -> Rotary:
    """The rotary of a layer type (or the model's one), every rope_type transformers 4.x / 5.x know that
    rope.KNOWN lists; `params` overrides the config's (gemma3's local layers under transformers 4)."""
    from . import rope

    params = params or rope.rope_params(config, layer_type)
    rope.check_known(params, config.model_type)
    kind = params["rope_type"]
    dim = rope.rotary_dim(params, head_dim)
    if kind == "default":
        return Rotary(rope.default_inv_freq(params["rope_theta"], dim), 1.0)
    if kind == "dynamic":
        base = rope.default_inv_freq(params["rope_theta"], dim)
        extra = dict(base=float(params["rope_theta"]), factor=float(params["factor"]))
        return Rotary(base, 1.0, "dynamic", max_pos=int(config.max_position_embeddings), **extra)
    if kind == "longrope":
        original = rope.original_length(config, params)
        short, scaling = rope.hf_inv_freq(config, params, layer_type)
        long, _ = rope.hf_inv_freq(config, params, layer_type, seq_len=original + 1)
        return Rotary(short, scaling, "longrope", long_inv_freq=long, original=original)
    inv_freq, scaling = rope.hf_inv_freq(config, params, layer_type)
    return Rotary(inv_freq, scaling)


def attend(q, k, v, mask, scale: float | None = None, softcap: float | None = None):
    """Scaled dot-product attention with grouped KV heads (scores soft-capped as cap·tanh(s/cap) before the
    mask, when a cap is given).

    q: (batch, heads, seq, d); k, v: (batch, kv_heads, total, d); mask: (batch, 1, seq, total) additive.
    """
    batch, heads, seq, d = q.shape
    kv_heads = k.shape[1]
    if heads != kv_heads:
        group = heads // kv_heads
        k = k.unsqueeze(2).expand(batch, kv_heads, group, k.shape[2], d).reshape(batch, heads, k.shape[2], d)
        v = v.unsqueeze(2).expand(batch, kv_heads, group, v.shape[2], d).reshape(batch, heads, v.shape[2], d)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, heads, seq, total)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # (batch, heads, seq, d)


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, head_dim).transpose(1, 2)  # (batch, heads, seq, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, d = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # fp32 throughout: the exporter mishandles no-op casts, and fp16 is a later graph rewrite
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def output_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits through a (vocab, hidden) weight, as a 2-D Gemm with transB, so a weight tied to the
    token embedding stays one initializer (a 3-D MatMul would make the exporter store its transpose)."""
    batch, seq, hidden = x.shape
    if bias is None:  # without a bias the exporter emits MatMul and folds in a transposed copy of the weight
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    logits = F.linear(x.reshape(batch * seq, hidden), weight, bias)  # (batch*seq, vocab)
    return logits.reshape(batch, seq, weight.shape[0])


def load_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into the module, failing loudly on anything missing or left over."""
    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"weights do not match the module: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, param in own.items():
            src = tensors[name]
            if src.shape != param.shape:
                raise ValueError(f"weight {name}: shape {tuple(src.shape)}, expected {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
