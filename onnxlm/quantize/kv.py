"""A smaller KV cache: float16, or int8 with one calibrated scale per channel.

onnxruntime's CPU GroupQueryAttention computes in float32 over a cache of another type (its
`T_CACHE`): float16 halves the cache, int8 quarters it (k_quant_type / v_quant_type PER_CHANNEL,
kv_cache_bit_width 8, the scales as inputs k_scale / v_scale of kv_heads x head_dim each; a stored
value is round(x / scale)). The rewrite changes each layer's past / present types and, for int8, gives
every GroupQueryAttention its layer's scales; the graph's other inputs and outputs stay as they are.

The long-decode switch (rewrites.py) reads the buffer with MatMuls that want float32, so a bundle with
a smaller cache runs GroupQueryAttention at every length: its decode slows sooner as the context
grows (benchmarks/README.md measures both).

An int8 cache is read fast by a decode step and slowly by a prefill: onnxruntime's CPU kernel for many
queries over an int8 cache runs at about half its float32 speed (benchmarks/README.md). So each int8
layer becomes If(a call brings more than FLOAT_PREFILL_FROM tokens to some row; float32 form; int8
GroupQueryAttention): the float32 form rotates and quantizes the new tokens' keys and values, runs
float32 GroupQueryAttention over the dequantized buffer and chunk (Cast, Mul by the scales), and
scatters the codes into the int8 buffer in place (the runtime binds one buffer as past and present). Decode steps and
speculation's short verify calls take the int8 kernel. Both forms read what the cache stores, the
chunk's own keys and values included, so a prompt gives the same result however it is chunked.

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
from ..rewrites import (
    Builder,
    chunk_positions,
    gqa_nodes,
    node_attrs,
    rotary_dim,
    rotated_qkv,
    unwrap_long_decode,
)
from .recipes import KV_CACHES

PREFIX = "/kv_cache/"
_TYPES = {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's input slots
PAST_K, PAST_V, SEQLENS_K, QUERY_SEQLENS = 3, 4, 5, 16
QUANT_ATTRS = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
# a call bringing more than this many tokens to some row (a prefill chunk) takes the float32 form; a
# decode step and a speculative verify (up to ~9 tokens) stay on the int8 kernel
FLOAT_PREFILL_FROM = 16


class KVCacheError(ValueError):
    """A KV cache type this graph cannot take; the message says why."""


def check(kind: str, model: onnx.ModelProto, io: B.GraphIO) -> None:
    """KVCacheError unless `model` (with `io`) can take a `kind` KV cache."""
    if kind not in KV_CACHES:
        raise KVCacheError(f"kv_cache must be one of {', '.join(KV_CACHES)}; got {kind!r}")
    if io.kv_dtype != "float32":
        raise KVCacheError(f"the graph's KV cache is already {io.kv_dtype}")
    nodes = layer_nodes(model)
    if not nodes or not io.shared:
        raise KVCacheError(
            "a float16 / int8 KV cache needs the fused graph (GroupQueryAttention over a shared buffer); "
            "this bundle has the plain graph (`onnxlm info` says why)"
        )


def layer_nodes(model: onnx.ModelProto) -> list:
    """Each layer's GroupQueryAttention node, also inside the long-decode If's or an int8 layer's If's
    else branch."""
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
        float_prefill(model, FLOAT_PREFILL_FROM)
        io.float_prefill_above = FLOAT_PREFILL_FROM
    io.kv_dtype = kind
    record = {"dtype": kind, "long_decode": "dropped (its MatMuls read a float32 cache)"}
    if kind == "int8":
        record["scales"] = "per layer, KV head and channel: calibrated max |x| / 127 (rotary pairs share one)"
        record["prefill"] = (
            f"float32 attention over the dequantized cache for calls of more than {FLOAT_PREFILL_FROM} tokens"
        )
    return record


def float_prefill(model: onnx.ModelProto, above: int = FLOAT_PREFILL_FROM) -> None:
    """Wrap every int8-cache GroupQueryAttention of `model` in If(max(query_seqlens) > above, float32
    form, the node as it is) (see the module's doc). Edits `model`."""
    nodes = gqa_nodes(model)
    b = Builder(model, prefix=PREFIX)
    first = nodes[0]
    q_max = b.op("ReduceMax", [first.input[QUERY_SEQLENS]], keepdims=0)
    cond = b.op("Greater", [q_max, b.const("above", np.array(above, np.int32))], [PREFIX + "use_float"])
    prelude = b.take()
    inits = {t.name: t for t in model.graph.initializer}
    layers = {}
    types = (TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT8)  # attention, present key, value
    for n in nodes:
        attrs = node_attrs(n)
        heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
        d = numpy_helper.to_array(inits[n.input[K_SCALE]]).size // kv_heads
        then_out = [f"{o}/float" for o in n.output]
        _float_layer(b, n, heads, kv_heads, d, rotary_dim(model, d), then_out)
        gqa = onnx.NodeProto()
        gqa.CopyFrom(n)
        del gqa.output[:]
        gqa.output.extend(f"{o}/int8" for o in n.output)

        def branch(nodes, outs, tag, n=n):
            infos = [onnx.helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types, strict=True)]
            return onnx.helper.make_graph(nodes, f"{n.name}/{tag}", [], infos)

        then_nodes = b.take()
        then = branch(then_nodes, then_out, "float")

        layers[n.name] = [
            onnx.helper.make_node(
                "If",
                [cond],
                list(n.output),
                name=f"{n.name}/float_prefill",
                then_branch=then,
                else_branch=branch([gqa], list(gqa.output), "int8"),
            )
        ]
    # the float32 forms' constants live in each branch, not in the main graph: every outer value a
    # branch reads is an implicit input the If passes on each call, decode steps included
    made = {t.name: t for t in model.graph.initializer if t.name not in inits}  # shapes, indices, bounds
    for (node,) in layers.values():
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        used = {i for m in then.node for i in m.input} & set(made)
        then.initializer.extend(made[name] for name in sorted(used))
    outer = {i for m in prelude for i in m.input}
    keep = [t for t in model.graph.initializer if t.name not in made or t.name in outer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    out = []
    for n in model.graph.node:
        if n.name == first.name:
            out += prelude
        out += layers.get(n.name, [n])
    del model.graph.node[:]
    model.graph.node.extend(out)


def _float_layer(b: Builder, n, heads: int, kv_heads: int, d: int, rotary: int, outputs: list[str]) -> None:
    """The float32 form of int8-cache GroupQueryAttention `n`, writing `outputs` (attention, present
    key, present value: the int8 buffers with the new tokens scattered in). As the int8 node does, it
    attends over what the cache stores, the chunk's own keys and values included: they are rotated
    here, quantized, scattered into the buffer and dequantized for a float32 GroupQueryAttention that
    does no rotary of its own."""
    chunk = chunk_positions(b, n.input[0], n.input[SEQLENS_K], n.input[QUERY_SEQLENS], kv_heads)
    # a right-padded row's padding lands past what it holds (never read: the runtime keeps room for it)
    index = chunk.index
    before = b.op("ReduceMax", [chunk.start], keepdims=1)  # [the most tokens a row held before the call]
    q, k, v = rotated_qkv(b, n, chunk.pos, heads, kv_heads, d, rotary, tag="float32/")
    stored = []
    for i, x in enumerate((k, v)):
        scale = b.op("Reshape", [n.input[(K_SCALE, V_SCALE)[i]], b.ints("scale4", 1, kv_heads, 1, d)])
        x = b.op("Transpose", [b.op("Reshape", [x, b.ints("kv_rows", 0, 0, kv_heads, d)])], perm=[0, 2, 1, 3])
        lo, hi = b.const("lo", np.array(-128, np.float32)), b.const("hi", np.array(127, np.float32))
        codes = b.op("Clip", [b.op("Round", [b.op("Div", [x, scale])]), lo, hi])  # (batch, kv, seq, d)
        past = n.input[(PAST_K, PAST_V)[i]]
        b.op("ScatterND", [past, index, b.op("Cast", [codes], to=TensorProto.INT8)], [outputs[1 + i]])
        new = b.op("Mul", [codes, scale])  # what the cache now holds, as float32
        new = b.op(
            "Reshape", [b.op("Transpose", [new], perm=[0, 2, 1, 3]), b.ints("merged", 0, 0, kv_heads * d)]
        )
        held = b.op("Slice", [past, b.ints("s0", 0), before, b.ints("s2", 2)])  # what any row held before
        stored.append((new, b.op("Mul", [b.op("Cast", [held], to=TensorProto.FLOAT), scale])))
    gqa = onnx.NodeProto()
    gqa.CopyFrom(n)
    gqa.name = f"{n.name}/float32"
    gqa.input[0], gqa.input[1], gqa.input[2] = q, stored[0][0], stored[1][0]
    gqa.input[PAST_K], gqa.input[PAST_V] = stored[0][1], stored[1][1]
    gqa.input[K_SCALE] = gqa.input[V_SCALE] = ""
    keep = [a for a in gqa.attribute if a.name not in (*QUANT_ATTRS, "do_rotary", "rotary_interleaved")]
    del gqa.attribute[:]
    gqa.attribute.extend(keep)
    del gqa.output[:]
    gqa.output.extend([outputs[0], *(f"{n.name}/float32/present_{w}" for w in "kv")])
    b.nodes.append(gqa)
