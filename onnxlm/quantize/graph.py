"""Reading weight sites out of an ONNX graph and building the quantized nodes that replace them.

    MatMul(x, W)          ->  MatMulNBits(x, Wq, scales[, zeros])
    Gemm(x, W, C, transB) ->  MatMulNBits(x, Wq, scales[, zeros]) [-> Add(C) when C is not all zero]
    Gather(E, ids)        ->  GatherBlockQuantized(Eq, ids, scales[, zeros])

A tied head and embedding read one packed tensor Wq (N, k_blocks, blob). GatherBlockQuantized
wants scales of the data's rank, so the shared form is:

    Wq (N, kb, blob) ──────────────────────────────► MatMulNBits ──► logits
       └─► GatherBlockQuantized(quantize_axis=2) ─► (…, kb, block) ─► Reshape(…, K) ─► hidden
    scales (N, kb) ─► Reshape (N, kb, 1) ─┘             Shape(ids) ++ [-1] ─┘
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .pack import Packed, unpack_values
from .recipes import Site, parse_scope

MS_DOMAIN = "com.microsoft"


def initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _float2d(t: TensorProto | None) -> bool:
    return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def find_sites(model: onnx.ModelProto, num_layers: int, hidden_size: int, vocab_size: int) -> list[Site]:
    """Every MatMul / Gemm / embedding Gather that reads a constant 2-D float32 weight (directly or
    through Identity nodes: the exporter reads a tensor equal to another through an Identity)."""
    inits = dict(initializers(model))
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    sites = []
    for node in model.graph.node:
        a = _attrs(node)
        layer, proj = parse_scope(node.name)
        common = dict(
            node=node.name,
            op=node.op_type,
            layer=layer,
            proj=proj,
            num_layers=num_layers,
            hidden_size=hidden_size,
        )
        if node.op_type == "MatMul" and _float2d(w := inits.get(node.input[1])):
            k, n = w.dims
            role = "head" if layer is None and n == vocab_size else "linear"
            sites.append(Site(role=role, weight=w.name, n=n, k=k, stored_kn=True, **common))
        elif (
            node.op_type == "Gemm"
            and _float2d(w := inits.get(node.input[1]))
            and not a.get("transA", 0)
            and a.get("alpha", 1.0) == 1.0
            and (a.get("beta", 1.0) == 1.0 or len(node.input) < 3)
        ):
            trans = bool(a.get("transB", 0))
            n, k = w.dims if trans else w.dims[::-1]
            role = "head" if layer is None and n == vocab_size else "linear"
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            sites.append(Site(role=role, weight=w.name, n=n, k=k, stored_kn=not trans, bias=bias, **common))
        elif (
            node.op_type == "Gather"
            and _float2d(w := inits.get(node.input[0]))
            and a.get("axis", 0) == 0
            and w.dims[0] == vocab_size
        ):
            n, k = w.dims
            sites.append(Site(role="embedding", weight=w.name, n=n, k=k, **common))
    return sites


def weight_users(model: onnx.ModelProto) -> Counter:
    """How many node inputs read each name (to know when an initializer is no longer needed)."""
    return Counter(i for node in model.graph.node for i in node.input)


def weight_nk(tensor: TensorProto, site: Site) -> np.ndarray:
    w = numpy_helper.to_array(tensor).astype(np.float32, copy=False)
    return np.ascontiguousarray(w.T) if site.stored_kn else w  # (N, K)


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a name produced by an initializer or a Constant node, else None."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            a = _attrs(node)
            if "value" in a:
                return numpy_helper.to_array(a["value"])
    return None


class PackedNames:
    """Initializers for one packed weight, added to the graph once and read by every site of its group."""

    def __init__(self, model: onnx.ModelProto, weight: str, packed: Packed, gather_only: bool):
        self.model = model
        self.packed = packed
        self.gather_only = gather_only  # no MatMulNBits reads it: store the table 2-D for the gather
        tag = f"_q{packed.bits}b{packed.block_size}"
        self.data = weight + tag
        self.scales = weight + tag + "_scales"
        self.zeros = weight + tag + "_zeros" if packed.zeros is not None else None
        self._add(self.data, packed.data.reshape(packed.n, -1) if gather_only else packed.data)
        self._add(self.scales, packed.scales)
        if self.zeros:
            self._add(self.zeros, packed.zeros)
        self._extra: dict[str, str] = {}

    def _add(self, name: str, array: np.ndarray) -> None:
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def extra(self, key: str, array_fn) -> str:
        """A derived initializer (made once per group), e.g. 4-bit zero points unpacked for a gather."""
        if key not in self._extra:
            name = f"{self.data}_{key}"
            self._add(name, array_fn())
            self._extra[key] = name
        return self._extra[key]


def matmul_nbits(model: onnx.ModelProto, node, site: Site, names: PackedNames, accuracy_level: int) -> list:
    """MatMulNBits for a MatMul / Gemm site; a Gemm's non-zero bias follows as an Add."""
    p = names.packed
    inputs = [node.input[0], names.data, names.scales] + ([names.zeros] if names.zeros else [])
    attrs = dict(K=site.k, N=site.n, bits=p.bits, block_size=p.block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    out = node.output[0]
    bias = None
    if site.bias:
        value = constant_value(model, site.bias)
        bias = None if value is not None and not np.any(value) else site.bias
    nodes = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [out + "_nobias" if bias else out],
            name=node.name + f"_Q{p.bits}",
            domain=MS_DOMAIN,
            **attrs,
        )
    ]
    if bias:
        nodes.append(helper.make_node("Add", [out + "_nobias", bias], [out], name=node.name + "_bias"))
    return nodes


def gather_block_quantized(node, names: PackedNames) -> list:
    """GatherBlockQuantized for the embedding (K must be a whole number of blocks). Alone, the table
    is stored 2-D (N, K*bits/8); shared with the head it reads MatMulNBits' 3-D tensor (module diagram)."""
    p = names.packed
    attrs = dict(gather_axis=0, block_size=p.block_size, bits=p.bits)
    ids, out = node.input[1], node.output[0]
    if names.gather_only:
        inputs = [names.data, ids, names.scales] + ([names.zeros] if names.zeros else [])
        return [
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                [out],
                name=node.name + f"_Q{p.bits}",
                domain=MS_DOMAIN,
                quantize_axis=1,
                **attrs,
            )
        ]
    pre = node.name
    shape3 = names.extra("shape3", lambda: np.array([p.n, p.k_blocks, 1], np.int64))
    minus1 = names.extra("minus1", lambda: np.array([-1], np.int64))
    nodes = [helper.make_node("Reshape", [names.scales, shape3], [pre + "/scales3d"], name=pre + "/scales3d")]
    inputs = [names.data, ids, pre + "/scales3d"]
    if names.zeros:
        if p.bits == 8:
            nodes.append(
                helper.make_node("Reshape", [names.zeros, shape3], [pre + "/zeros3d"], name=pre + "/zeros3d")
            )
            inputs.append(pre + "/zeros3d")
        else:  # 4-bit zeros are packed along k_blocks; the 3-D form wants one per byte (small copy)
            z = names.extra("zeros3d", lambda: unpack_values(p.zeros, 4)[:, : p.k_blocks].reshape(p.n, -1, 1))
            inputs.append(z)
    nodes += [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [pre + "/blocks"],
            name=node.name + f"_Q{p.bits}",
            domain=MS_DOMAIN,
            quantize_axis=2,
            **attrs,
        ),
        helper.make_node("Shape", [ids], [pre + "/ids_shape"], name=pre + "/ids_shape"),
        helper.make_node(
            "Concat", [pre + "/ids_shape", minus1], [pre + "/out_shape"], name=pre + "/out_shape", axis=0
        ),
        helper.make_node("Reshape", [pre + "/blocks", pre + "/out_shape"], [out], name=pre + "/merge_blocks"),
    ]
    return nodes


def replace_nodes(model: onnx.ModelProto, replacements: dict[str, list]) -> None:
    """Swap nodes by name for their replacements, keeping the topological order."""
    new = []
    for node in model.graph.node:
        new.extend(replacements.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(new)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers, Constant and Identity nodes nothing reads any more (a Gemm's zero bias,
    the Identity that aliased a weight now packed)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = set(weight_users(model)) | outputs
        dead = [
            n for n in model.graph.node if n.op_type in ("Constant", "Identity") and n.output[0] not in used
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
