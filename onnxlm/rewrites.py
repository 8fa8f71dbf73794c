"""Attention as MatMul / Softmax over the shared KV buffer, and the per-layer switch that uses it for
decode steps at long contexts.

onnxruntime's CPU GroupQueryAttention runs one GEMM per query head, each repacking its KV head's keys
and values: at 2,000 tokens SmolLM2 spends ~60% of a decode step there. Over the same buffer, plain
operators pack each KV head's keys once per step and read the values where they lie
(benchmarks/attention.py measures both):

    q, k, v = Split(qkv);  q, k = RotaryEmbedding(q, k at their positions)
    K = ScatterND(past_k, [row, head, position], k)          in place: past and present are one buffer
    V = ScatterND(past_v, ...)
    p = Softmax(q·Kᵀ / √d + causal mask over the whole buffer)          q grouped by KV head
    out = p·V                                   decode: one GEMV per query head

It loses to GroupQueryAttention on short contexts and in prefill (it multiplies whole score matrices),
so `wrap_long_decode` keeps both: each layer's GroupQueryAttention moves into the else branch of an If
whose then branch is the MatMul form, taken when every row brings one token and holds at least
`from_tokens`, and the buffer is at most 4/3 of the shortest row (the MatMul form works over the whole
buffer; the graph's inputs and outputs do not change, the runtime drives it as before). The
MatMul form assumes every row brings the same number of tokens (one per row when the If takes it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "/long_decode/"
# tokens held from which a decode step takes the MatMul form when asked for (--long-decode-from): per
# layer the two cost the same at ~500 tokens (benchmarks/attention.py: 155 vs 153 µs at 512, 623 vs 533
# at 2,048). End to end the If costs more than it saves with onnxruntime 1.32, so exports leave it out
# by default (benchmarks/README.md, "The long-decode switch, measured again").
FROM_TOKENS = 512


class Builder:
    """Nodes and constants with unique names under `prefix`; constants go to the main graph."""

    def __init__(self, model: onnx.ModelProto, prefix: str = PREFIX):
        self.prefix = prefix
        self.graph = model.graph
        self.names = {t.name for t in model.graph.initializer}
        self.count = 0
        self.nodes: list = []

    def const(self, name: str, value) -> str:
        full = self.prefix + name
        if full not in self.names:
            self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), full))
            self.names.add(full)
        return full

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, np.int64))

    def op(self, kind: str, inputs: list[str], outputs: list[str] | None = None, **attrs):
        self.count += 1
        name = f"{self.prefix}{kind}_{self.count}"
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(kind, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def take(self) -> list:
        nodes, self.nodes = self.nodes, []
        return nodes


def node_attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gqa_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def rotary_dim(model: onnx.ModelProto, head_dim: int) -> int:
    """Channels the rotary covers: twice the cos cache's width (an initializer, or the inv_freq the
    exporter computes it from in the graph)."""
    for t in model.graph.initializer:
        if t.name == "cos_cache":
            return 2 * t.dims[1]
        if t.name == "rotary_inv_freq":
            return 2 * t.dims[0]
    return head_dim


class Chunk:
    """Where a call's tokens go, as graph values: [batch], [seq], each row's tokens held after the call
    and before it (batch,), each token's position (batch, seq), and the ScatterND indices (batch,
    kv_heads, seq, 3) = [row, head, position] that write the chunk's keys or values into a buffer."""

    def __init__(self, batch: str, seq: str, held_after: str, start: str, pos: str, index: str):
        self.batch, self.seq = batch, seq
        self.held_after, self.start = held_after, start
        self.pos, self.index = pos, index


def chunk_positions(b: Builder, qkv: str, seqlens_k: str, query_seqlens: str, kv_heads: int) -> Chunk:
    """The Chunk of a GroupQueryAttention call over a shared buffer (seqlens_k: held after - 1; rows
    right-padded: a row's padding positions lie past what it holds)."""
    zero, one = b.const("zero", np.array(0, np.int64)), b.const("one", np.array(1, np.int64))
    shape = b.op("Shape", [qkv])
    batch = b.op("Gather", [shape, b.ints("i0", 0)], axis=0)  # [batch]
    seq = b.op("Gather", [shape, b.ints("i1", 1)], axis=0)  # [seq]
    held_after = b.op("Add", [b.op("Cast", [seqlens_k], to=TensorProto.INT64), one])
    start = b.op("Sub", [held_after, b.op("Cast", [query_seqlens], to=TensorProto.INT64)])  # (batch,)
    steps = b.op("Range", [zero, b.op("Squeeze", [seq, b.ints("a0", 0)]), one])  # (seq,)
    pos = b.op(
        "Add", [b.op("Unsqueeze", [start, b.ints("a1", 1)]), b.op("Unsqueeze", [steps, b.ints("a0", 0)])]
    )
    target = b.op("Concat", [batch, b.ints("kv", kv_heads), seq, b.ints("c1", 1)], axis=0)
    rows = b.op("Range", [zero, b.op("Squeeze", [batch, b.ints("a0", 0)]), one])
    parts = [
        b.op("Reshape", [rows, b.ints("rows4", -1, 1, 1, 1)]),
        b.const(f"heads{kv_heads}", np.arange(kv_heads, dtype=np.int64).reshape(1, kv_heads, 1, 1)),
        b.op("Unsqueeze", [pos, b.ints("a13", 1, 3)]),  # (batch, 1, seq, 1)
    ]
    index = b.op("Concat", [b.op("Expand", [p, target]) for p in parts], axis=3)
    return Chunk(batch, seq, held_after, start, pos, index)


def rotated_qkv(
    b: Builder, node, pos: str, heads: int, kv_heads: int, d: int, rotary_dim: int, tag: str
) -> tuple[str, str, str]:
    """GroupQueryAttention `node`'s query, key and value (batch, seq, heads·d), split apart if packed,
    and the query and key rotated at positions `pos` as the node would (none for a NoPE layer's node).
    `tag` keeps the split's outputs apart from another form's."""
    attrs = node_attrs(node)
    if node.input[1]:  # q, k, v apart (q/k norms ran before the node)
        q, k, v = node.input[0], node.input[1], node.input[2]
    else:
        q, k, v = b.op(
            "Split",
            [node.input[0], b.ints(f"split{heads}_{kv_heads}_{d}", heads * d, kv_heads * d, kv_heads * d)],
            [f"{node.name}/{tag}{x}" for x in "qkv"],
            axis=2,
        )
    if attrs.get("do_rotary", 0):
        rot = {"interleaved": attrs.get("rotary_interleaved", 0)}
        if rotary_dim != d:
            rot["rotary_embedding_dim"] = rotary_dim
        cos, sin = node.input[7], node.input[8]
        q = b.op("RotaryEmbedding", [q, pos, cos, sin], domain="com.microsoft", num_heads=heads, **rot)
        k = b.op("RotaryEmbedding", [k, pos, cos, sin], domain="com.microsoft", num_heads=kv_heads, **rot)
    return q, k, v


class _Shared:
    """What every layer's MatMul attention reads, computed once per step from the first layer's inputs:
    positions, scatter indices, the additive causal mask per sliding window, reshape targets."""

    def __init__(self, b: Builder, first, heads: int, kv_heads: int, head_dim: int):
        self.b = b
        past_k = first.input[3]
        chunk = chunk_positions(b, first.input[0], first.input[5], first.input[16], kv_heads)
        batch, seq = chunk.batch, chunk.seq
        self.held_after, self.pos, self.index = chunk.held_after, chunk.pos, chunk.index
        zero, one = b.const("zero", np.array(0, np.int64)), b.const("one", np.array(1, np.int64))
        self.capacity = capacity = b.op("Gather", [b.op("Shape", [past_k]), b.ints("i2", 2)], axis=0)  # [cap]
        keys = b.op("Range", [zero, b.op("Squeeze", [capacity, b.ints("a0d", 0)]), one])  # (capacity,)
        self.key_pos = b.op("Unsqueeze", [keys, b.ints("a01", 0, 1)])  # (1, 1, capacity)
        self.query_pos = b.op("Unsqueeze", [self.pos, b.ints("am1", -1)])  # (batch, seq, 1)
        self.masks: dict[int, str] = {}
        group = heads // kv_heads
        self.grouped = b.op(
            "Concat", [batch, b.ints("kv2", kv_heads), b.ints("g", group), seq, capacity], axis=0
        )
        self.flat = b.op("Concat", [batch, b.ints("kv3", kv_heads), b.ints("m1", -1), capacity], axis=0)

    def mask(self, window: int) -> str:
        """(batch, 1, 1, seq, capacity): 0 where key j is visible to the query at position t (j <= t,
        and t - j < window for a sliding window), -inf elsewhere."""
        if window not in self.masks:
            b = self.b
            visible = b.op("LessOrEqual", [self.key_pos, self.query_pos])
            if window >= 0:
                recent = b.op(
                    "Less",
                    [
                        b.op("Sub", [self.query_pos, self.key_pos]),
                        b.const(f"w{window}", np.array(window, np.int64)),
                    ],
                )
                visible = b.op("And", [visible, recent])
            zero, ninf = (
                b.const("f0", np.array(0, np.float32)),
                b.const("ninf", np.array(-np.inf, np.float32)),
            )
            self.masks[window] = b.op(
                "Unsqueeze", [b.op("Where", [visible, zero, ninf]), b.ints("a12", 1, 2)]
            )
        return self.masks[window]


def _layer(
    b: Builder,
    node,
    shared: _Shared,
    heads: int,
    kv_heads: int,
    d: int,
    rotary_dim: int,
    outputs,
    one_token: bool,
) -> None:
    """The MatMul form of one GroupQueryAttention node, writing `outputs` (attention, present k, v).
    one_token (decode steps): probabilities times values as one GEMV per query head, which reads the
    values where they lie; a GEMM over a KV head's group of queries repacks them first."""
    past_k, past_v = node.input[3], node.input[4]
    attrs = node_attrs(node)
    window = attrs.get("local_window_size", -1)
    q, k, v = rotated_qkv(b, node, shared.pos, heads, kv_heads, d, rotary_dim, tag="")
    kv_rows = b.ints("kv_rows", 0, 0, kv_heads, d)
    k = b.op("Transpose", [b.op("Reshape", [k, kv_rows])], perm=[0, 2, 1, 3])  # (batch, kv_heads, seq, d)
    v = b.op("Transpose", [b.op("Reshape", [v, kv_rows])], perm=[0, 2, 1, 3])
    keys = b.op("ScatterND", [past_k, shared.index, k], [outputs[1]])
    values = b.op("ScatterND", [past_v, shared.index, v], [outputs[2]])
    q = b.op("Transpose", [b.op("Reshape", [q, b.ints("q_rows", 0, 0, heads, d)])], perm=[0, 2, 1, 3])
    scale = attrs.get("scale", 0.0) or d**-0.5  # GroupQueryAttention's 0 means 1/sqrt(d)
    q = b.op(
        "Mul",
        [
            b.op("Reshape", [q, b.ints("by_group", 0, kv_heads, -1, d)]),
            b.const(f"scale_{scale!r}", np.array(scale, np.float32)),
        ],
    )
    scores = b.op("MatMul", [q, b.op("Transpose", [keys], perm=[0, 1, 3, 2])])  # (batch, kv, group·seq, cap)
    cap = attrs.get("softcap", 0.0)
    if cap:  # cap·tanh(scores / cap), before the mask as in GroupQueryAttention
        c = b.const(f"softcap_{cap!r}", np.array(cap, np.float32))
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, c])]), c])
    scores = b.op("Add", [b.op("Reshape", [scores, shared.grouped]), shared.mask(window)])
    probs = b.op("Softmax", [scores], axis=-1)  # (batch, kv, group, seq, cap)
    if one_token:  # (batch, kv, group, 1, cap) @ (batch, kv, 1, cap, d)
        out = b.op("MatMul", [probs, b.op("Unsqueeze", [values, b.ints("a2", 2)])])
    else:  # (batch, kv, group·seq, cap) @ (batch, kv, cap, d)
        out = b.op("MatMul", [b.op("Reshape", [probs, shared.flat]), values])
    out = b.op("Reshape", [out, b.ints("by_head", 0, heads, -1, d)])
    b.op(
        "Reshape",
        [b.op("Transpose", [out], perm=[0, 2, 1, 3]), b.ints("merged", 0, 0, heads * d)],
        [outputs[0]],
    )


def _prepare(model: onnx.ModelProto):
    gqas = gqa_nodes(model)
    if not gqas:
        raise ValueError("the graph has no GroupQueryAttention")
    a = node_attrs(gqas[0])
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    past = next(i for i in model.graph.input if i.name == gqas[0].input[3])
    d = past.type.tensor_type.shape.dim[3].dim_value  # (batch, kv_heads, capacity, head_dim)
    b = Builder(model)
    shared = _Shared(b, gqas[0], heads, kv_heads, d)
    for n in gqas:  # every mask now, so that all of them land in the main graph
        shared.mask(node_attrs(n).get("local_window_size", -1))
    return gqas, b, shared, heads, kv_heads, d, rotary_dim(model, d)


def matmul_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every GroupQueryAttention replaced by the MatMul form (for measuring it alone: every row must
    bring the same number of tokens). Edits `model` and returns it."""
    gqas, b, shared, heads, kv_heads, d, rotary_dim = _prepare(model)
    prelude = b.take()
    layers = {}
    for n in gqas:
        _layer(b, n, shared, heads, kv_heads, d, rotary_dim, list(n.output), one_token=False)
        layers[n.name] = b.take()
    _splice(model, gqas[0].name, prelude, layers)
    return model


def wrap_long_decode(model: onnx.ModelProto, from_tokens: int = FROM_TOKENS) -> onnx.ModelProto:
    """Each GroupQueryAttention becomes If(every row brings one token, holds >= from_tokens and the
    buffer is at most 4/3 of the shortest row, MatMul form, GroupQueryAttention). Edits `model`."""
    if from_tokens < 1:
        raise ValueError(f"from_tokens must be at least 1, got {from_tokens}")
    gqas, b, shared, heads, kv_heads, d, rotary_dim = _prepare(model)
    shared_nodes = b.take()  # what only the MatMul form reads: computed only on steps that take it
    query_seqlens, seqlens_k, past_k = gqas[0].input[16], gqas[0].input[5], gqas[0].input[3]
    one = b.const("one32", np.array(1, np.int32))
    single = b.op("Equal", [b.op("ReduceMax", [query_seqlens], keepdims=0), one])
    single = b.op("And", [single, b.op("Equal", [b.op("ReduceMin", [query_seqlens], keepdims=0), one])])
    shortest = b.op("Add", [b.op("ReduceMin", [seqlens_k], keepdims=0), one])  # the shortest row after
    shortest = b.op("Cast", [shortest], to=TensorProto.INT64)
    long = b.op("GreaterOrEqual", [shortest, b.const("from", np.array(from_tokens, np.int64))])
    # the MatMul form works over the whole buffer, GroupQueryAttention over what each row holds: take
    # it only while the buffer is at most 4/3 of the shortest row (the runtime grows buffers ahead)
    capacity = b.op("Gather", [b.op("Shape", [past_k]), b.const("i2s", np.array(2, np.int64))], axis=0)
    full = b.op(
        "LessOrEqual",
        [
            b.op("Mul", [capacity, b.const("three", np.array(3, np.int64))]),
            b.op("Mul", [shortest, b.const("four", np.array(4, np.int64))]),
        ],
    )
    cond = b.op("And", [b.op("And", [single, long]), full], [PREFIX + "use_matmul"])
    prelude = [*b.take(), _prelude_if(cond, shared_nodes, shared)]
    kv_type = next(i for i in model.graph.input if i.name == gqas[0].input[3]).type.tensor_type.elem_type
    types = (kv_type, kv_type, kv_type)  # attention output and buffers share the KV dtype
    layers = {}
    for n in gqas:
        then_out = [f"{o}/matmul" for o in n.output]
        else_out = [f"{o}/gqa" for o in n.output]
        _layer(b, n, shared, heads, kv_heads, d, rotary_dim, then_out, one_token=True)
        gqa = onnx.NodeProto()
        gqa.CopyFrom(n)
        del gqa.output[:]
        gqa.output.extend(else_out)

        def branch(nodes, outs, tag, n=n):
            infos = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types, strict=True)]
            return helper.make_graph(nodes, f"{n.name}/{tag}", [], infos)

        layers[n.name] = [
            helper.make_node(
                "If",
                [cond],
                list(n.output),
                name=f"{n.name}/long_decode",
                then_branch=branch(b.take(), then_out, "matmul"),
                else_branch=branch([gqa], else_out, "gqa"),
            )
        ]
    _splice(model, gqas[0].name, prelude, layers)
    return model


def _prelude_if(cond: str, nodes: list, shared: _Shared) -> onnx.NodeProto:
    """One If around what every layer's MatMul form reads (positions, scatter indices, masks, shapes):
    a step that takes GroupQueryAttention computes none of it (the else branch is a few constants).

        If(use_matmul) then: the shared nodes -> pos, index, grouped, flat, masks
                       else: placeholders of the same types (never read)"""
    exported = [shared.pos, shared.index, shared.grouped, shared.flat, *shared.masks.values()]
    inner = {name: f"{name}/prelude" for name in exported}
    then_nodes = []
    for n in nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for i, x in enumerate(m.output):
            m.output[i] = inner.get(x, x)
        for i, x in enumerate(m.input):
            m.input[i] = inner.get(x, x)
        then_nodes.append(m)
    types = [TensorProto.INT64] * 4 + [TensorProto.FLOAT] * len(shared.masks)
    else_nodes = [
        helper.make_node(
            "Constant",
            [],
            [f"{name}/unused"],
            value=numpy_helper.from_array(np.zeros(1, np.int64 if t == TensorProto.INT64 else np.float32)),
        )
        for name, t in zip(exported, types, strict=True)
    ]

    def outs(suffix):
        return [
            helper.make_tensor_value_info(f"{n}/{suffix}", t, None)
            for n, t in zip(exported, types, strict=True)
        ]

    return helper.make_node(
        "If",
        [cond],
        exported,
        name=PREFIX + "prelude",
        then_branch=helper.make_graph(then_nodes, PREFIX + "prelude/then", [], outs("prelude")),
        else_branch=helper.make_graph(else_nodes, PREFIX + "prelude/else", [], outs("unused")),
    )


def unwrap_long_decode(model: onnx.ModelProto) -> bool:
    """Put each wrapped GroupQueryAttention back in the main graph and drop the MatMul form and what
    only it reads (the float16 recipe: its MatMuls have no float16 CPU kernel). True if there was any."""
    nodes, found = [], False
    for n in model.graph.node:
        if n.op_type == "If" and n.name.endswith("/long_decode"):
            found = True
            else_branch = next(a.g for a in n.attribute if a.name == "else_branch")
            gqa = onnx.NodeProto()
            gqa.CopyFrom(else_branch.node[0])
            del gqa.output[:]
            gqa.output.extend(n.output)
            nodes.append(gqa)
        elif not n.name.startswith(PREFIX):
            nodes.append(n)
    if found:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        keep = [t for t in model.graph.initializer if not t.name.startswith(PREFIX)]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return found


def from_tokens_of(model: onnx.ModelProto) -> int | None:
    """The threshold a wrapped graph switches at (None: not wrapped)."""
    for t in model.graph.initializer:
        if t.name == PREFIX + "from":
            return int(numpy_helper.to_array(t))
    return None


def _splice(model: onnx.ModelProto, first: str, prelude: list, layers: dict[str, list]) -> None:
    nodes = []
    for n in model.graph.node:
        if n.name == first:
            nodes += prelude
        nodes += layers.get(n.name, [n])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
