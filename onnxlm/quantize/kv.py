"""A smaller KV cache: float16, or int8 with one calibrated scale per channel.

onnxruntime's CPU GroupQueryAttention computes in float32 over a cache of another type (its
`T_CACHE`): float16 halves the cache, int8 quarters it (k_quant_type / v_quant_type PER_CHANNEL,
kv_cache_bit_width 8, the scales as inputs k_scale / v_scale of kv_heads x head_dim each; a stored
value is round(x / scale)). The rewrite changes each layer's past / present types and, for int8, gives
every GroupQueryAttention its layer's scales; the graph's other inputs and outputs stay as they are.

The long-decode switch (rewrites.py) reads the buffer with MatMuls that want float32, so a bundle with
a smaller cache runs GroupQueryAttention at every length: its decode slows sooner as the context
grows (benchmarks/README.md measures both).

int8 scales come from running the float32 graph over calibration text: per layer, per KV head and
channel, the largest |key| and |value| seen. A rotary pair of key channels gets one scale (the larger
of the two): rotation moves magnitude between them with the position, so a channel's range at an
unseen position is the pair's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import bundle as B
from ..rewrites import gqa_nodes, unwrap_long_decode
from .recipes import KV_CACHES

_TYPES = {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's input slots


class KVCacheError(ValueError):
    """A KV cache type this graph cannot take; the message says why."""


def check(kind: str, model: onnx.ModelProto, io: B.GraphIO) -> None:
    """KVCacheError unless `model` (with `io`) can take a `kind` KV cache."""
    if kind not in KV_CACHES:
        raise KVCacheError(f"kv_cache must be one of {', '.join(KV_CACHES)}; got {kind!r}")
    if io.kv_dtype != "float32":
        raise KVCacheError(f"the graph's KV cache is already {io.kv_dtype}")
    nodes = _layer_nodes(model)
    if not nodes or not io.shared:
        raise KVCacheError(
            "a float16 / int8 KV cache needs the fused graph (GroupQueryAttention over a shared buffer); "
            "this bundle has the plain graph (`onnxlm info` says why)"
        )


def _layer_nodes(model: onnx.ModelProto) -> list:
    """GroupQueryAttention nodes, also those inside the long-decode If's else branch."""
    found = list(gqa_nodes(model))
    for n in model.graph.node:
        if n.op_type == "If":
            for a in n.attribute:
                if a.name == "else_branch":
                    found += [m for m in a.g.node if m.op_type == "GroupQueryAttention"]
    return found


def calibrate(src: Path, manifest: B.Manifest, text: str, rotary: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key scale, value scale), each (kv_heads * head_dim,) float32: the largest magnitude
    the float32 graph of bundle `src` writes to the cache over `text`, / 127. rotary: the key channels
    the rotary covers (rewrites.rotary_dim)."""
    import onnxruntime as ort

    from .gptq import calibration_feeds

    facts, io = manifest.model, manifest.io
    feeds = calibration_feeds(text, src / B.TOKENIZER, manifest)
    names = [(io.present_key.format(i=i), io.present_value.format(i=i)) for i in range(facts.num_layers)]
    flat = [n for pair in names for n in pair]
    session = ort.InferenceSession(str(src / B.MODEL), providers=["CPUExecutionProvider"])
    most = np.zeros((len(flat), facts.num_kv_heads, facts.head_dim), np.float32)
    for feed in feeds:
        n = int(feed[io.input_ids].shape[1])
        for j, x in enumerate(session.run(flat, feed)):  # (1, kv_heads, >= n, head_dim)
            np.maximum(most[j], np.abs(x[0, :, :n]).max(axis=1), out=most[j])
    del session
    half = rotary // 2
    most[0::2, :, :half] = most[0::2, :, half:rotary] = np.maximum(
        most[0::2, :, :half], most[0::2, :, half:rotary]
    )
    scales = np.maximum(most, 1e-6).reshape(len(flat), -1) / 127.0
    return [(scales[2 * i], scales[2 * i + 1]) for i in range(facts.num_layers)]


def rewrite(
    model: onnx.ModelProto,
    io: B.GraphIO,
    kind: str,
    scales: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Give `model` a `kind` KV cache (edits it and `io`); returns what the manifest records."""
    if kind == "float32":
        return {}
    check(kind, model, io)
    if unwrap_long_decode(model):
        io.long_decode_from = None
    nodes = gqa_nodes(model)  # one per layer, in order
    by_past = {n.input[3]: n for n in nodes}
    elem = _TYPES[kind]
    names = set()
    for i in range(len(nodes)):
        names |= {io.past_key.format(i=i), io.past_value.format(i=i)}
        names |= {io.present_key.format(i=i), io.present_value.format(i=i)}
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in names:
            v.type.tensor_type.elem_type = elem
    if kind == "int8":
        if scales is None or len(scales) != len(nodes):
            raise KVCacheError(f"an int8 KV cache needs one (key, value) scale pair per layer ({len(nodes)})")
        for i, (k, v) in enumerate(scales):
            node = by_past[io.past_key.format(i=i)]
            while len(node.input) <= V_SCALE:
                node.input.append("")
            for slot, value, what in ((K_SCALE, k, "k"), (V_SCALE, v, "v")):
                name = f"/kv_cache/layers.{i}/{what}_scale"
                model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
                node.input[slot] = name
            node.attribute.extend(
                [
                    onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                    onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                    onnx.helper.make_attribute("kv_cache_bit_width", 8),
                ]
            )
    io.kv_dtype = kind
    record = {"dtype": kind, "long_decode": "dropped (its MatMuls read a float32 cache)"}
    if kind == "int8":
        record["scales"] = "per layer, KV head and channel: calibrated max |x| / 127 (rotary pairs share one)"
    return record
