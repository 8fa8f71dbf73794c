"""Reading weight sites out of an ONNX graph and building the quantized nodes that replace them.

    MatMul(x, W)          ->  MatMulNBits(x, Wq, scales[, zeros])
    Gemm(x, W, C, transB) ->  MatMulNBits(x, Wq, scales[, zeros]) [-> Add(C) when C is not all zero]
    Gather(E, ids)        ->  GatherBlockQuantized(Eq, ids, scales[, zeros])

Scales are float16-representable (or 8-bit codes, Packed.coded) and stored as the float32 the
kernels read, with the offsets scheme min derives from them: computed from float16 in the graph,
onnxruntime would fold them at load into float32 copies held in the heap for good (MatMulNBits keeps
the scales it packed from: ~21 MB for SmolLM2 int4, ~30 MB with the gather's tables), where stored
they stay in the mapped file, whose pages the runtime drops once the session is built
(runtime.session.release_mapped_files). The bundle carries the bytes instead (+~26 MB for SmolLM2).

Scheme `min` (w = q·scale + min), folded (pack.fold_min; the integer recipes): integer zero points
and each block's remainder as a code in extra blocks, which MatMulNBits multiplies by the input's block
sums appended to the input; one kernel call per weight, the sums and the Concat shared per input:

    x ─► MatMul(x, ones (K, pad + extra·block)) ─► Concat(x, sums) ─► MatMulNBits(Wq|codes, zeros) ─► y

Exact (GGUF kept blocks): the sym kernel, which computes Σ (q - 2^(bits-1))·scale·x, plus what that
leaves out, one small correction per weight:

    x ─► MatMulNBits(Wq, scales) ───────────────────────────► Add ─► y
    └──► MatMul(x, ones (K, k_blocks)) ─► MatMul(offsetsᵀ) ──┘      offsets = min + 2^(bits-1)·scale

A tied head and embedding read one packed tensor Wq (N, k_blocks, blob). GatherBlockQuantized
wants scales of the data's rank, so the shared form is:

    Wq (N, kb, blob), scales (N, kb) ──────────────► MatMulNBits ──► logits
       └─► GatherBlockQuantized(quantize_axis=2) ─► (…, kb, block) ─► Reshape(…, K) ─► hidden
    scales (N, kb, 1), its own copy ─┘                  Shape(ids) ++ [-1] ─┘
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .pack import Packed, fold_min, unpack_values
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
    """How many nodes read each name, their subgraphs' reads included (to know when an initializer is
    no longer needed)."""
    return Counter(i for node in model.graph.node for i in _reads(node))


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
    """Initializers for one packed weight, added to the graph once and read by every site of its group.
    Every float a kernel reads is stored as the float32 it reads (module docstring), but for the exact
    branch's offsets, computed at load by `self.nodes` (constant-only; the caller adds them)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        weight: str,
        packed: Packed,
        gather_only: bool,
        gathered: bool = True,
        fold: int = 0,
    ):
        """gather_only: no MatMulNBits reads it; gathered: an embedding Gather does; fold: serve scheme
        min folded (module docstring), with that many codes a remainder (pack.fold_min), to the
        MatMulNBits that read it; 0: the exact correction branch."""
        self.model = model
        self.packed = packed
        self.nodes: list = []
        # no MatMulNBits reads it and no offsets follow: store the table 2-D for the gather
        self.gather_only = gather_only and packed.mins is None
        tag = f"_q{packed.bits}b{packed.block_size}"
        self.data = weight + tag
        self.zeros = weight + tag + "_zeros" if packed.zeros is not None else None
        self.folded = None
        if fold and packed.mins is not None and not gather_only:
            self.folded = fold_min(packed, fold)
        stored = self.folded.data if self.folded is not None else packed.data
        self._add(self.data, packed.data.reshape(packed.n, -1) if self.gather_only else stored)
        own = self._values(packed.scales, "scales")  # (N, kb): each block's scale as the kernels read it
        self.scales = weight + tag + "_scales"  # the own blocks' scales: what a gather-only table reads
        if self.zeros:
            self._add(self.zeros, packed.zeros)
        self.offsets = self.offsets_t = None
        # what a MatMulNBits reads (folded: the remainder blocks' scales after the row's own, and zeros)
        self.kernel_scales, self.kernel_zeros = self.scales, self.zeros
        self.kernel_values = own
        if self.folded is not None:
            f = self.folded
            self.kernel_values = np.concatenate([own, _half32(f.scales[:, f.k_blocks :])], axis=1)
            self.kernel_scales = weight + tag + "_kscales"
            self.kernel_zeros = weight + tag + "_kzeros"
            self._add(self.kernel_zeros, f.zeros)
        self._add(self.kernel_scales, self.kernel_values)
        centre = np.float32(2.0 ** (packed.bits - 1))
        if packed.mins is not None and gathered:
            # min + 2^(bits-1)·scale: the offset a block's codes, read as sym, leave out (float32 ops
            # in the graph's order: Mul, then Add)
            self.offsets = weight + tag + "_offsets"
            self._add(self.offsets, (self._values(packed.mins, "mins") + own * centre).astype(np.float32))
        if packed.mins is not None and self.folded is None and not gather_only:
            # the correction branch's (kb, N) table: a MatMul packs it at load and lets go of what it
            # packed from, so it is computed there from the float16 minimums, not stored at float32
            mins = self._stored(weight + tag + "_mins", packed.mins, "mins")
            centre_name = weight + tag + "_centre"
            self._add(centre_name, np.array(centre))
            shifted, offsets = weight + tag + "_shift", weight + tag + "_offsets_c"
            self.offsets_t = weight + tag + "_offsetsT"
            self.nodes += [
                helper.make_node("Mul", [self.kernel_scales, centre_name], [shifted], name=shifted),
                helper.make_node("Add", [mins, shifted], [offsets], name=offsets),
                helper.make_node("Transpose", [offsets], [self.offsets_t], name=self.offsets_t, perm=[1, 0]),
            ]
        self._extra: dict[str, str] = {}

    def _add(self, name: str, array: np.ndarray) -> None:
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def _stored(self, name: str, array: np.ndarray, key: str) -> str:
        """float16, or 8-bit codes decoded by lo + code * step (Packed.coded), made float32 by nodes that
        onnxruntime folds at load; returns the float32 name."""
        coded = (self.packed.coded or {}).get(key)
        if coded is None:
            return self._half(name, array)
        self._add(name + "_codes", coded.codes)
        lo, step = self._half(name + "_lo", coded.lo), self._half(name + "_step", coded.step)
        codesf, scaled = name + "_codesf", name + "_scaled"
        self.nodes += [
            helper.make_node("Cast", [name + "_codes"], [codesf], name=codesf, to=TensorProto.FLOAT),
            helper.make_node("Mul", [codesf, step], [scaled], name=scaled),
            helper.make_node("Add", [scaled, lo], [name], name=name),
        ]
        return name

    def _half(self, name: str, array: np.ndarray) -> str:
        """Store `array` as float16 under name + "16"; return the name of its float32 Cast."""
        self._add(name + "16", array.astype(np.float16))
        self.nodes.append(helper.make_node("Cast", [name + "16"], [name], name=name, to=TensorProto.FLOAT))
        return name

    def _values(self, array: np.ndarray, key: str) -> np.ndarray:
        """float32 (N, kb) as a kernel reads them: float16-representable, or decoded from the 8-bit
        codes (Packed.coded) in float32 arithmetic, lo + code·step."""
        coded = (self.packed.coded or {}).get(key)
        return _half32(array) if coded is None else coded.values()

    def extra(self, key: str, array_fn) -> str:
        """A derived initializer (made once per group), e.g. 4-bit zero points unpacked for a gather."""
        if key not in self._extra:
            name = f"{self.data}_{key}"
            self._add(name, array_fn())
            self._extra[key] = name
        return self._extra[key]


def _half32(x: np.ndarray) -> np.ndarray:
    """float32 values through float16 (what the packers' float16 rounding kept), as float32."""
    return np.asarray(x).astype(np.float16).astype(np.float32)


# for BlockSums.rank: ops whose first output has as many axes as the largest of their inputs, and ops
# whose first output has as many as their first input
_ELEMENTWISE = frozenset("Add Sub Mul Div Pow Max Min Where".split())
_FIRST_INPUT_RANK = frozenset(
    "Relu Sigmoid Tanh Gelu FastGelu QuickGelu BiasGelu Softmax Cast Identity Erf Neg Sqrt "
    "SimplifiedLayerNormalization SkipSimplifiedLayerNormalization LayerNormalization "
    "SkipLayerNormalization GroupQueryAttention MultiHeadAttention MatMulNBits Split Slice Transpose "
    "Concat".split()
)


class BlockSums:
    """Per-block sums of a MatMul input, one node group per (input, block size), shared by every weight
    that reads that input (q|k|v, gate and up). Where K is a whole number of blocks the sums are a
    Reshape and a ReduceSum (no weights read); otherwise a MatMul with a 0/1 summing matrix, one per
    (K, block size). The summing MatMul read its K x blocks table every call: SmolLM2's tables for
    K = 576 and 1,536 are 147 and 786 KB, ~37 MB a decode step from the cache beside the weights
    (the ReduceSum form measured 2-4% faster a step, benchmarks/README.md)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.made = {o for n in model.graph.node for o in n.output if "_blocksums" in o}  # earlier passes
        self.made |= {t.name for t in model.graph.initializer if t.name.startswith("blocksums_")}
        self._ranks: dict[str, int | None] | None = None  # per value, made by rank() on first use

    def rank(self, name: str) -> int | None:
        """How many axes the value `name` has, where the graph says: a graph input, an initializer or
        value_info with a shape, else carried forward (one pass in the graph's order) through the ops
        whose output has their inputs' rank (element-wise: the largest; norms, activations and
        attention: their first input's; MatMul: the larger). None where unknown: the summing-matrix
        form then, which takes any rank."""
        if self._ranks is None:
            g = self.model.graph
            ranks: dict[str, int | None] = {t.name: len(t.dims) for t in g.initializer}
            for v in [*g.input, *g.value_info]:
                if v.type.tensor_type.HasField("shape"):
                    ranks[v.name] = len(v.type.tensor_type.shape.dim)
            for n in g.node:
                if not n.output or all(o in ranks for o in n.output):
                    continue
                known = [ranks.get(i) for i in n.input if i]
                if n.op_type in _ELEMENTWISE or n.op_type == "MatMul":
                    r = max(known) if known and None not in known else None
                elif n.op_type in _FIRST_INPUT_RANK:
                    r = known[0] if known else None
                elif n.op_type == "Gather" and len(known) == 2 and None not in known:
                    r = known[0] + known[1] - 1  # a table's rows at the indices' places
                elif n.op_type == "GatherBlockQuantized" and len(known) >= 2 and known[1] is not None:
                    r = known[1] + 1  # rows of a (packed) 2-D table
                else:
                    continue
                for o in n.output if n.op_type == "Split" else n.output[:1]:
                    ranks.setdefault(o, r)
            self._ranks = ranks
        return self._ranks.get(name)

    def __call__(self, x: str, k: int, block_size: int) -> tuple[str, list]:
        name, ones = f"{x}_blocksums{block_size}", f"blocksums_{k}x{block_size}"
        if name in self.made:
            return name, []
        self.made.add(name)
        rank = self._reducible(x, k, block_size)
        if rank:
            return name, self._reduce(x, k, block_size, rank, name)
        made = []
        if ones not in self.made:
            made, self.made = self._table(ones, k, block_size), self.made | {ones}
        return name, made + [helper.make_node("MatMul", [x, ones], [name], name=name)]

    def _reducible(self, x: str, k: int, block_size: int) -> int | None:
        """x's rank where its block sums can be a Reshape and a ReduceSum (K a whole number of blocks,
        the rank known), else None: the summing-matrix form."""
        return self.rank(x) if k % block_size == 0 else None

    def _reduce(self, x: str, k: int, block_size: int, rank: int, out: str) -> list:
        """x (..., K) of `rank` axes -> its block sums (..., K / block_size): a Reshape to (..., blocks,
        block_size) and a ReduceSum."""
        shape, axis = f"blocksums_{k}x{block_size}_rank{rank}", "blocksums_last_axis"
        for key, value in ((shape, [0] * (rank - 1) + [k // block_size, block_size]), (axis, [-1])):
            if key not in self.made:
                self.model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), key))
                self.made.add(key)
        return [
            helper.make_node("Reshape", [x, shape], [out + "_blocks"], name=out + "_blocks"),
            helper.make_node("ReduceSum", [out + "_blocks", axis], [out], name=out, keepdims=0),
        ]

    def appended(self, x: str, f) -> tuple[str, list]:
        """x with its block sums appended where a folded weight (pack.Folded) reads them: zeros up to
        the row's padded length, then per remainder region (f.digits) the sums and zeros to its end."""
        k, bs = f.k, f.block_size
        width = f.k_served - k
        name, table = f"{x}_blocksums{bs}_appended{width}", f"blocksums_{k}x{bs}_appended{width}"
        if name in self.made:
            return name, []
        made = []
        region = f.extra // f.digits * bs
        shifts = [f.k_blocks * bs - k + i * region for i in range(f.digits)]  # where each region starts
        sums = f"{x}_blocksums{bs}_w{width}"
        if self._reducible(x, k, bs):  # the sums themselves, then a (blocks, width) placing matrix
            placed, blocks = self(x, k, bs)
            place = f"blocksums_{k // bs}x1_placed{width}"
            if place not in self.made:
                made += self._table(place, k // bs, 1, shifts, width)
                self.made.add(place)
            made += blocks + [helper.make_node("MatMul", [placed, place], [sums], name=sums)]
        else:
            if table not in self.made:
                made = self._table(table, k, bs, shifts, width)
                self.made.add(table)
            made.append(helper.make_node("MatMul", [x, table], [sums], name=sums))
        self.made.add(name)
        return name, made + [helper.make_node("Concat", [x, sums], [name], name=name, axis=-1)]

    def _table(
        self, name: str, k: int, block_size: int, shifts: list[int] = (0,), width: int | None = None
    ) -> list:
        """(K, width) float, 1 where row k lies in block b - shift for any of `shifts` (width:
        k_blocks by default): built from scalars by nodes that onnxruntime folds at load, so the bundle
        carries a few bytes instead of K·width floats."""
        width = -(-k // block_size) if width is None else width
        scalars = {"zero": 0, "one": 1, "k": k, "kb": width, "bs": block_size, "axis": [1]}
        scalars.update({f"shift{i}": v for i, v in enumerate(shifts)})
        for key, v in scalars.items():
            self.model.graph.initializer.append(
                numpy_helper.from_array(np.array(v, np.int64), f"{name}_{key}")
            )
        n = name + "_"
        nodes = [
            helper.make_node("Range", [n + "zero", n + "k", n + "one"], [n + "rows"], name=n + "rows"),
            helper.make_node("Div", [n + "rows", n + "bs"], [n + "row_block"], name=n + "row_block"),
            helper.make_node("Unsqueeze", [n + "row_block", n + "axis"], [n + "column"], name=n + "column"),
            helper.make_node("Range", [n + "zero", n + "kb", n + "one"], [n + "blocks"], name=n + "blocks"),
        ]
        masks = []
        for i in range(len(shifts)):
            at, mask = f"{n}at{i}", f"{n}mask{i}"
            nodes += [
                helper.make_node("Add", [n + "column", f"{n}shift{i}"], [at], name=at),
                helper.make_node("Equal", [at, n + "blocks"], [mask], name=mask),
            ]
            masks.append(mask)
        while len(masks) > 1:
            either = f"{n}either{len(masks)}"
            nodes.append(helper.make_node("Or", masks[:2], [either], name=either))
            masks = [either, *masks[2:]]
        nodes.append(helper.make_node("Cast", [masks[0]], [name], name=name, to=TensorProto.FLOAT))
        return nodes


def matmul_nbits(
    model: onnx.ModelProto,
    node,
    site: Site,
    names: PackedNames,
    accuracy_level: int,
    block_sums: BlockSums | None = None,
) -> list:
    """MatMulNBits for a MatMul / Gemm site; scheme `min` reads its input's block sums, folded, or adds
    its correction branch, exact (module diagram); a Gemm's non-zero bias follows as an Add."""
    p = names.packed
    x, nodes = node.input[0], []
    k = site.k
    if names.folded is not None:
        x, nodes = (block_sums or BlockSums(model)).appended(x, names.folded)
        k = names.folded.k_served
    inputs = [x, names.data, names.kernel_scales] + ([names.kernel_zeros] if names.kernel_zeros else [])
    attrs = dict(K=k, N=site.n, bits=p.bits, block_size=p.block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    out = node.output[0]
    bias = None
    if site.bias:
        value = constant_value(model, site.bias)
        bias = None if value is not None and not np.any(value) else site.bias
    main = out + "_nobias" if bias else out
    if names.offsets_t:
        main = out + "_main"
    nodes += [
        helper.make_node(
            "MatMulNBits", inputs, [main], name=node.name + f"_Q{p.bits}", domain=MS_DOMAIN, **attrs
        )
    ]
    if names.offsets_t:
        sums, made = (block_sums or BlockSums(model))(node.input[0], site.k, p.block_size)
        nodes += made + [
            helper.make_node(
                "MatMul", [sums, names.offsets_t], [out + "_offset"], name=node.name + "_offset"
            ),
            helper.make_node(
                "Add",
                [out + "_main", out + "_offset"],
                [out + "_nobias" if bias else out],
                name=node.name + "_min",
            ),
        ]
    if bias:
        nodes.append(helper.make_node("Add", [out + "_nobias", bias], [out], name=node.name + "_bias"))
    return nodes


def gather_block_quantized(node, names: PackedNames) -> list:
    """GatherBlockQuantized for the embedding (K must be a whole number of blocks). Alone, the table
    is stored 2-D (N, K*bits/8); shared with the head it reads MatMulNBits' 3-D tensor (module diagram)."""
    p = names.packed
    ids, out = node.input[1], node.output[0]

    def gather(inputs: list[str], output: str, quantize_axis: int):
        return helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [output],
            name=node.name + f"_Q{p.bits}",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=quantize_axis,
            block_size=p.block_size,
            bits=p.bits,
        )

    if names.gather_only:
        return [gather([names.data, ids, names.scales] + ([names.zeros] if names.zeros else []), out, 1)]
    pre = node.name
    f = names.folded  # the head's folded table: the gather reads its own blocks without zero points
    blocks_stored = p.k_blocks + (f.extra if f is not None else 0)
    minus1 = names.extra("minus1", lambda: np.array([-1], np.int64))
    # the gather's own copy of the scales, of the data's rank (a Reshape of the kernel's would be
    # folded at load into a float32 copy held in memory; stored, it stays in the mapped file)
    scales3d = names.extra("scales3d", lambda: names.kernel_values.reshape(p.n, blocks_stored, 1))
    nodes: list = []
    inputs = [names.data, ids, scales3d]
    if names.zeros:
        if p.bits == 8:
            inputs.append(names.extra("zeros3d", lambda: p.zeros.reshape(p.n, -1, 1)))
        else:  # 4-bit zeros are packed along k_blocks; the 3-D form wants one per byte (small copy)
            z = names.extra("zeros3d", lambda: unpack_values(p.zeros, 4)[:, : p.k_blocks].reshape(p.n, -1, 1))
            inputs.append(z)
    blocks = pre + "/blocks"
    nodes.append(gather(inputs, blocks, 2))
    if f is not None:  # the remainder blocks off: the offsets below are the exact minimums
        start = names.extra("zero1", lambda: np.array([0], np.int64))
        end = names.extra("own_blocks", lambda: np.array([p.k_blocks], np.int64))
        axis = names.extra("minus2", lambda: np.array([-2], np.int64))
        nodes.append(helper.make_node("Slice", [blocks, start, end, axis], [pre + "/own"], name=pre + "/own"))
        blocks = pre + "/own"
    if names.offsets:  # scheme min: each block's offset, gathered by token and broadcast over the block
        nodes += [
            helper.make_node(
                "Gather", [names.offsets, ids], [pre + "/offsets"], name=pre + "/offsets", axis=0
            ),
            helper.make_node(
                "Unsqueeze", [pre + "/offsets", minus1], [pre + "/offsets3d"], name=pre + "/offsets3d"
            ),
            helper.make_node(
                "Add", [blocks, pre + "/offsets3d"], [pre + "/blocks_min"], name=pre + "/blocks_min"
            ),
        ]
        blocks = pre + "/blocks_min"
    nodes += [
        helper.make_node("Shape", [ids], [pre + "/ids_shape"], name=pre + "/ids_shape"),
        helper.make_node(
            "Concat", [pre + "/ids_shape", minus1], [pre + "/out_shape"], name=pre + "/out_shape", axis=0
        ),
        helper.make_node("Reshape", [blocks, pre + "/out_shape"], [out], name=pre + "/merge_blocks"),
    ]
    return nodes


def replace_nodes(model: onnx.ModelProto, replacements: dict[str, list], prelude: list = ()) -> None:
    """Swap nodes by name for their replacements (and add `prelude`), then restore a topological
    order: a shared node (block sums) may have been emitted after one of its readers."""
    new = list(prelude)
    for node in model.graph.node:
        new.extend(replacements.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(topological(new, model))


def _reads(node) -> set[str]:
    """Names a node reads, including those its subgraphs (If / Loop bodies) read from outside."""
    names = set(node.input)
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
            for n in g.node:
                names |= _reads(n)
    return names


def topological(nodes: list, model: onnx.ModelProto) -> list:
    """Nodes ordered so each comes after the producers of its inputs; ties keep the given order."""
    import heapq

    ready_names = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in _reads(n) if x not in ready_names and x in producer}
        waiting[i] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(i)
    heap = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        out.append(nodes[i])
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if not waiting[r]:
                heapq.heappush(heap, r)
    if len(out) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")  # a bug in a rewrite, never user input
    return out


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
