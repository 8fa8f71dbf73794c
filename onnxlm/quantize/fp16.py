"""float16 weights and compute, for GPU execution providers, with a keep-float32 list.

onnxruntime ships onnxconverter-common's converter as onnxruntime.transformers.float16; it casts at
the border of every node left in float32. What stays float32, and why:
  - normalisation written out as ops (Pow, ReduceMean, ...): x² overflows float16 once |x| > 256;
  - Softmax: summing exponentials;
  - everything that does not depend on the hidden state (rotary angles, the attention mask): a
    position times a frequency loses whole radians in float16 beyond ~2k positions;
  - the logits output (sampling precision); the KV cache inputs/outputs become float16.
"""

from __future__ import annotations

import re

import onnx

KEEP_OPS = ("Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Cos", "Sin", "Range", "CumSum")
# onnxruntime's fused norms (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
# LayerNormalization) accumulate in float32 inside the kernel: they run in float16 here.
KEEP_SCOPES = re.compile(r"(?:^|/)[^/]*(?:norm|ln_\w*|ln_f)[^/]*/", re.IGNORECASE)


def hidden_state_nodes(model: onnx.ModelProto, sources: set[str]) -> set[str]:
    """Names of nodes producing or downstream of the given tensors (the embedding output, the past KV)."""
    live, names = set(sources), set()
    for node in model.graph.node:  # the graph is topologically sorted
        if any(i in live for i in node.input) or any(o in sources for o in node.output):
            live.update(node.output)
            names.add(node.name)
    return names


def keep_fp32(model: onnx.ModelProto, state_sources: set[str]) -> list[str]:
    downstream = hidden_state_nodes(model, state_sources)
    kept = {
        n.name
        for n in model.graph.node
        if n.op_type in KEEP_OPS or KEEP_SCOPES.search(n.name) or n.name not in downstream
    }
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    for n in model.graph.node:  # a Constant read only by kept nodes stays float32 too (eps, -inf masks)
        if n.op_type == "Constant" and all(r in kept for r in readers.get(n.output[0], [None])):
            kept.add(n.name)
    return [n.name for n in model.graph.node if n.name in kept]


def drop_round_trips(model: onnx.ModelProto, kept: set[str]) -> int:
    """The converter casts every kept node's output to float16 and back for the next kept node
    (x² of a norm overflows on the way); read the float32 value directly instead."""
    producer = {o: n.name for n in model.graph.node for o in n.output}
    to16 = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Cast" and _to(n) == onnx.TensorProto.FLOAT16 and producer.get(n.input[0]) in kept
    }
    rename, dead = {}, set()
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        if (
            n.op_type == "Cast"
            and _to(n) == onnx.TensorProto.FLOAT
            and n.input[0] in to16
            and n.output[0] not in outputs
        ):
            rename[n.output[0]] = to16[n.input[0]]
            dead.add(n.name)
    for n in model.graph.node:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]
    still_read = {i for n in model.graph.node if n.name not in dead for i in n.input} | outputs
    dead |= {
        n.name
        for n in model.graph.node
        if n.op_type == "Cast" and n.output[0] in to16 and n.output[0] not in still_read
    }
    keep = [n for n in model.graph.node if n.name not in dead]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(rename)


def _to(node) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)


def convert(
    model: onnx.ModelProto, keep_io: list[str], state_sources: set[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """The float16 model and the nodes kept in float32. `keep_io`: graph IO names left float32.

    The converter places its Casts from value_info: the caller runs shape inference on the graph
    before loading the weights (inference serialises the model, impossible past 2 GB)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    kept = keep_fp32(model, state_sources)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io,
        node_block_list=kept,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(KEEP_OPS),
        disable_shape_infer=True,
    )
    drop_round_trips(converted, set(kept))
    return converted, kept
