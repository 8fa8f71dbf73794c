"""Keep a GGUF's own quantized blocks instead of dequantizing and re-quantizing them.

Q8_0 (w = d·q, q int8) maps exactly onto MatMulNBits bits=8 with zero point 128. Q4_1
(w = d·q + m, q in 0..15) has a per-block minimum that MatMulNBits' fast path cannot take, so:

    X ─► MatMulNBits(B=q, scales=d, zero_points=0) ─────────────┐
    │                                                            Add ─► Y
    └─► Reshape(…, K/32, 32) ─► ReduceSum(-1) ─► MatMul(mᵀ) ─────┘

the second branch adds Σ_blocks m·Σ(x in block), which is exact (the int8 activations of
accuracy level 4 aside).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK = 32  # elements per block in Q4_0 / Q4_1 / Q8_0

# our llama-family projections -> the GGUF tensors whose rows they stack (merged ones in order)
PROJ_TO_GGUF = {
    "q_proj": ("attn_q",),
    "k_proj": ("attn_k",),
    "v_proj": ("attn_v",),
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_proj": ("ffn_gate",),
    "up_proj": ("ffn_up",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}
# MatMulNBits compute type per block kind, measured on SmolLM2 (2 cores, one decode step at 64 past):
# Q4_1 at fp32 compute (1) is exact and as fast as int8 activations (4), which cost +2.6% perplexity;
# Q8_0 (the 49152-row head) at fp32 compute has no fast kernel (186 ms/step vs 25 ms at level 4).
DEFAULT_ACCURACY = {"q4_1": 1, "q8_0": 4}
NODE_NAME = re.compile(r"^/layers\.(\d+)/(\w+)/MatMul$")


@dataclass
class Blocks:
    """One weight (N, K) as MatMulNBits wants it: B (N, K/32, blob) uint8, scales (N, K/32)."""

    kind: str  # "q4_1" or "q8_0"
    packed: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None  # q4_1 only, (N, K/32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * QK

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, computed as ggml does (d·q + m)."""
        n, nb, _ = self.packed.shape
        if self.kind == "q8_0":
            q = self.packed.astype(np.float32) - 128.0
            return (self.scales[..., None] * q).reshape(n, nb * QK)
        q = np.empty((n, nb, QK), np.uint8)
        q[..., 0::2] = self.packed & 0x0F
        q[..., 1::2] = self.packed >> 4
        return (self.scales[..., None] * q.astype(np.float32) + self.mins[..., None]).reshape(n, nb * QK)


def _from_q4_1(raw: np.ndarray) -> Blocks:
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)  # (N, K/32, [d f16, m f16, 16 bytes of nibbles])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # ggml: low nibbles are elements 0..15
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: low nibble first
    return Blocks("q4_1", packed, d, m)


def _from_q8_0(raw: np.ndarray) -> Blocks:
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)  # (N, K/32, [d f16, 32 × int8])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8)
    return Blocks("q8_0", (q.astype(np.int16) + 128).astype(np.uint8), d, None)


def _reverse_permute_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of q/k (as transformers' GGUF loader does)."""
    dim = n_rows // heads // 2
    return np.arange(n_rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(n_rows)


def read_gguf_blocks(path: str | Path, num_heads: int, num_kv_heads: int) -> dict[str, Blocks]:
    """Every Q4_1 / Q8_0 tensor of a GGUF, by GGUF name, rows in transformers' order."""
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0"):
            continue
        raw = np.asarray(t.data)
        b = _from_q4_1(raw) if kind == "Q4_1" else _from_q8_0(raw)
        heads = num_heads if ".attn_q." in t.name else num_kv_heads if ".attn_k." in t.name else 0
        if heads:
            perm = _reverse_permute_rows(b.packed.shape[0], heads)
            b = Blocks(b.kind, b.packed[perm], b.scales[perm], None if b.mins is None else b.mins[perm])
        out[t.name] = b
    return out


def gguf_names(node_name: str) -> tuple[str, ...] | None:
    """The GGUF tensors behind one of our projection MatMuls (several when it is a merged one)."""
    m = NODE_NAME.match(node_name)
    if not m or m.group(2) not in PROJ_TO_GGUF:
        return None
    return tuple(f"blk.{m.group(1)}.{t}.weight" for t in PROJ_TO_GGUF[m.group(2)])


def stack(parts: list[Blocks]) -> Blocks | None:
    """Blocks of a merged projection: rows stacked; None when the parts differ in kind."""
    if len({b.kind for b in parts}) != 1:
        return None
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else np.concatenate([b.mins for b in parts])
    return Blocks(
        parts[0].kind,
        np.concatenate([b.packed for b in parts]),
        np.concatenate([b.scales for b in parts]),
        mins,
    )


def matmul_nodes(blocks: Blocks, x: str, y: str, prefix: str, accuracy_level: int):
    """Nodes and initializers computing y = x @ Wᵀ from GGUF blocks (see the module diagram)."""
    from onnx import helper, numpy_helper

    n, k = blocks.shape
    nb = k // QK
    bits = 8 if blocks.kind == "q8_0" else 4
    inits = [
        numpy_helper.from_array(blocks.packed, f"{prefix}.B"),
        numpy_helper.from_array(blocks.scales, f"{prefix}.scales"),
    ]
    if bits == 8:
        zp = np.full((n, nb), 128, np.uint8)
    else:
        zp = np.zeros((n, (nb + 1) // 2), np.uint8)  # two 4-bit zero points per byte, all 0
    inits.append(numpy_helper.from_array(zp, f"{prefix}.zero_points"))
    main = y if blocks.mins is None else f"{prefix}.main"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [x, f"{prefix}.B", f"{prefix}.scales", f"{prefix}.zero_points"],
            [main],
            name=f"{prefix}/MatMulNBits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=QK,
            accuracy_level=accuracy_level,
        )
    ]
    if blocks.mins is not None:
        inits += [
            numpy_helper.from_array(np.array([0, 0, nb, QK], np.int64), f"{prefix}.block_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.last_axis"),
            numpy_helper.from_array(np.ascontiguousarray(blocks.mins.T), f"{prefix}.minsT"),  # (K/32, N)
        ]
        nodes += [
            helper.make_node(
                "Reshape", [x, f"{prefix}.block_shape"], [f"{prefix}.xb"], name=f"{prefix}/Reshape"
            ),
            helper.make_node(
                "ReduceSum",
                [f"{prefix}.xb", f"{prefix}.last_axis"],
                [f"{prefix}.xsum"],
                name=f"{prefix}/ReduceSum",
                keepdims=0,
            ),
            helper.make_node(
                "MatMul",
                [f"{prefix}.xsum", f"{prefix}.minsT"],
                [f"{prefix}.corr"],
                name=f"{prefix}/MinsMatMul",
            ),
            helper.make_node("Add", [main, f"{prefix}.corr"], [y], name=f"{prefix}/Add"),
        ]
    return nodes, inits


def _embedding_nodes(blocks: Blocks, gather, prefix: str):
    """GatherBlockQuantized over the same bytes the head's MatMulNBits reads (8-bit blocks only):
    a Reshape views B (N, K/32, 32) as (N, K), so the tied table is stored once."""
    from onnx import helper, numpy_helper

    n, k = blocks.shape
    shape = numpy_helper.from_array(np.array([n, k], np.int64), f"{prefix}.table_shape")
    nodes = [
        helper.make_node(
            "Reshape",
            [f"{prefix}.B", f"{prefix}.table_shape"],
            [f"{prefix}.table"],
            name=f"{prefix}/TableView",
        ),
        helper.make_node(
            "GatherBlockQuantized",
            [f"{prefix}.table", gather.input[1], f"{prefix}.scales", f"{prefix}.zero_points"],
            list(gather.output),
            name=f"{prefix}/GatherBlockQuantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=QK,
            bits=8,
        ),
    ]
    return nodes, [shape]


def keep_gguf_blocks(
    model, blocks: dict[str, Blocks], accuracy_level: int | None = None, check: bool = True
) -> dict[str, str]:
    """Rewrite an exported llama-family graph in place so every weight that the GGUF stores as
    Q4_1 / Q8_0 is served from those blocks. Returns {node name: what it became}.

    With `check`, each weight's blocks must dequantize to exactly the graph's fp32 weight (the bundle
    was exported from this GGUF); anything else is refused rather than silently mixed.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # the exporter may emit a constant (the head's zero bias) as a node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], node.attribute[0].t)
    new_nodes, drop, report = [], set(), {}
    tied_head = None
    for node in graph.node:
        names = gguf_names(node.name) if node.op_type == "MatMul" else None
        is_head = (
            node.op_type == "Gemm"
            and node.input[1] in inits
            and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        )
        if is_head:
            names = ("output.weight",) if "output.weight" in blocks else ("token_embd.weight",)
        b = stack([blocks[n] for n in names]) if names and all(n in blocks for n in names) else None
        if b is None:
            new_nodes.append(node)
            continue
        target = "+".join(names)
        weight = numpy_helper.to_array(inits[node.input[1]])
        expected = weight if is_head else weight.T  # (N, K)
        if check and (expected.shape != b.shape or not np.array_equal(b.dequantize(), expected)):
            raise ValueError(
                f"{node.name}: the GGUF's {target} does not match the bundle's weight; "
                "was this bundle exported from that GGUF?"
            )
        prefix = "gguf." + target.removesuffix(".weight")
        out = node.output[0]
        bias = node.input[2] if is_head and len(node.input) > 2 and node.input[2] else None
        if bias and np.any(numpy_helper.to_array(inits[bias])):
            out = f"{prefix}.nobias"
        level = DEFAULT_ACCURACY[b.kind] if accuracy_level is None else accuracy_level
        nodes, new_inits = matmul_nodes(b, node.input[0], out, prefix, level)
        if out != node.output[0]:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{prefix}/Bias"))
        new_nodes += nodes
        graph.initializer.extend(new_inits)
        drop.add(node.input[1])
        if bias and out == node.output[0]:
            drop.add(bias)
        report[node.name] = f"gguf {b.kind}"
        if is_head and target == "token_embd.weight":
            tied_head = (b, prefix)
    if tied_head is not None:  # the embedding Gather reads the head's blocks
        b, prefix = tied_head
        for i, node in enumerate(new_nodes):
            if node.op_type == "Gather" and node.input[0] in drop and b.kind == "q8_0":
                nodes, new_inits = _embedding_nodes(b, node, prefix)
                new_nodes[i : i + 1] = nodes
                graph.initializer.extend(new_inits)
                report[node.name] = "gguf q8_0 (GatherBlockQuantized, shares the head's blocks)"
                break
    still_used = {i for n in new_nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name not in drop or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return report


def find_gguf(manifest, gguf_path: str | Path | None) -> Path:
    """The GGUF a bundle was exported from: the given file, or the cached default it names; checked by sha256."""
    from ..bundle import sha256_file
    from ..export import sources

    prov = manifest.provenance
    if prov.get("source_kind") != "gguf":
        raise ValueError("this bundle was not exported from a GGUF file; there are no blocks to keep")
    want = prov.get("source_sha256")
    if gguf_path is None:
        known = [p for p in sources.DEFAULTS.values() if p.gguf_sha256 == want]
        if not known:
            raise ValueError("give the GGUF this bundle was exported from (--gguf FILE)")
        gguf_path = sources.pull(known[0].name)
    path = Path(gguf_path)
    if sha256_file(path) != want:
        raise ValueError(f"{path}: is not the GGUF this bundle was exported from (sha256 differs)")
    return path


def keep_blocks(
    bundle_dir,
    out_dir,
    gguf_path=None,
    *,
    accuracy_level: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a bundle whose weights are the source GGUF's own Q4_1 / Q8_0 blocks (recipe `gguf`)."""
    import time

    import onnx
    from tqdm.auto import tqdm

    from .. import bundle as B
    from .api import _check_out, _manifest

    started = time.perf_counter()
    src = Path(bundle_dir)
    manifest = B.check_bundle(src, verify_hashes=True)
    if manifest.quantization:
        raise ValueError(f"{src}: is already quantized; keep blocks from the float32 bundle")
    gguf = find_gguf(manifest, gguf_path)
    _check_out(src, Path(out_dir), overwrite)
    writer = B.BundleWriter(out_dir, overwrite=overwrite)
    bar = tqdm(total=3, desc="quantize gguf", unit="step", disable=not progress)
    try:
        bar.set_postfix_str("reading blocks")
        blocks = read_gguf_blocks(gguf, manifest.model.num_heads, manifest.model.num_kv_heads)
        model = onnx.load(str(src / B.MODEL))
        bar.update()
        bar.set_postfix_str("rewriting")
        nodes = keep_gguf_blocks(model, blocks, accuracy_level=accuracy_level)
        if not nodes:
            raise ValueError(f"{gguf}: none of its tensors is Q4_1 or Q8_0 where this graph has a weight")
        bar.update()
        bar.set_postfix_str("writing")
        with writer as tmp:
            B.save_graph(model, tmp)
            del model
            B.copy_side_files(manifest, src, tmp)
            kinds = sorted({v.split()[1] for v in nodes.values()})
            record = {
                "recipe": "gguf",
                "summary": "the source GGUF's own blocks, unchanged: Q8_0 -> MatMulNBits 8-bit (zero point 128), "
                "Q4_1 -> MatMulNBits 4-bit (zero point 0) + the block minimums as a correction branch",
                "accuracy_level": accuracy_level if accuracy_level is not None else DEFAULT_ACCURACY,
                "gguf_sha256": manifest.provenance.get("source_sha256"),
                "block_kinds": kinds,
                "nodes": nodes,
                "bytes": {
                    "before": (src / B.MODEL_DATA).stat().st_size,
                    "after": (tmp / B.MODEL_DATA).stat().st_size,
                },
                "seconds": round(time.perf_counter() - started, 1),
            }
            bar.update()
            return writer.commit(_manifest(manifest, src, B.GraphIO(**vars(manifest.io)), "int4", record))
    finally:
        bar.close()
