"""Keep a GGUF's own quantized blocks instead of dequantizing and re-quantizing them.

Q8_0 (w = d·q, q int8) maps exactly onto MatMulNBits bits=8, sym (zero point 128). Q4_1
(w = d·q + m, q in 0..15) is the integer recipes' scheme `min` (pack.py): the sym kernel plus a
per-block correction (graph.py's diagram), exact up to float32 rounding (and the int8 activations of
accuracy level 4). d and m are float16 in the GGUF and stay float16 in the bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pack import Packed

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


def packed(blocks: Blocks) -> Packed:
    """The blocks as pack.Packed: Q8_0 is sym 8-bit (q + 128, zero point 128); Q4_1 is scheme min."""
    _, k = blocks.shape
    bits = 8 if blocks.kind == "q8_0" else 4
    return Packed(blocks.packed, blocks.scales, None, bits, QK, k, mins=blocks.mins)


def keep_gguf_blocks(
    model,
    blocks: dict[str, Blocks],
    vocab_size: int,
    accuracy_level: int | None = None,
    check: bool = True,
) -> dict[str, str]:
    """Rewrite an exported llama-family graph in place so every weight that the GGUF stores as
    Q4_1 / Q8_0 is served from those blocks (graph.py's nodes, as the integer recipes build them).
    Returns {node name: what it became}.

    With `check`, each weight's blocks must dequantize to exactly the graph's fp32 weight (the bundle
    was exported from this GGUF); anything else is refused rather than silently mixed.
    """
    from . import graph as G
    from .weights import groups

    inits = G.initializers(model)
    by_name = {n.name: n for n in model.graph.node}
    sites = G.find_sites(model, 0, 0, vocab_size)
    tied = "output.weight" not in blocks
    replacements, prelude, report = {}, [], {}
    block_sums = G.BlockSums(model)
    for (weight, _), group in groups(sites).items():
        first = group[0]
        if first.role == "linear":
            names = gguf_names(first.node)
        else:  # the head, and the embedding (which reads the head's tensor when they are tied)
            names = ("output.weight",) if first.role == "head" and not tied else ("token_embd.weight",)
        b = stack([blocks[n] for n in names]) if names and all(n in blocks for n in names) else None
        if b is None:
            continue
        target = "+".join(names)
        w = G.weight_nk(inits[weight], first)
        if check and (w.shape != b.shape or not np.array_equal(b.dequantize(), w)):
            raise ValueError(
                f"{first.node}: the GGUF's {target} does not match the bundle's weight; "
                "was this bundle exported from that GGUF?"
            )
        p = packed(b)
        names_ = G.PackedNames(model, weight, p, gather_only=all(x.role == "embedding" for x in group))
        prelude += names_.nodes
        level = DEFAULT_ACCURACY[b.kind] if accuracy_level is None else accuracy_level
        for x in group:
            node = by_name[x.node]
            if x.role == "embedding":
                replacements[x.node] = G.gather_block_quantized(node, names_)
                report[x.node] = f"gguf {b.kind} (GatherBlockQuantized" + (
                    ", shares the head's blocks)" if len(group) > 1 else ")"
                )
            else:
                replacements[x.node] = G.matmul_nbits(model, node, x, names_, level, block_sums)
                report[x.node] = f"gguf {b.kind}"
    G.replace_nodes(model, replacements, prelude)
    G.drop_unused_initializers(model)
    G.ensure_ms_opset(model)
    return report


def find_gguf(manifest, gguf_path: str | Path | None) -> Path:
    """The GGUF a bundle was exported from, checked by sha256. A path only: quantize never fetches
    (`onnxlm pull` does, and the CLI passes the default model's cached file)."""
    from ..bundle import sha256_file

    prov = manifest.provenance
    if prov.get("source_kind") != "gguf":
        raise ValueError("this bundle was not exported from a GGUF file; there are no blocks to keep")
    if gguf_path is None:
        raise ValueError(f"give the GGUF this bundle was exported from ({prov.get('source')}): --gguf FILE")
    path = Path(gguf_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    if sha256_file(path) != prov.get("source_sha256"):
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
    staging: bool = False,
) -> Path:
    """Write a bundle whose weights are the source GGUF's own Q4_1 / Q8_0 blocks (recipe `gguf`);
    staging as in quantize()."""
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
    writer = B.BundleWriter(out_dir, overwrite=overwrite, staging=staging)
    bar = tqdm(total=3, desc="quantize gguf", unit="step", disable=not progress)
    try:
        bar.set_postfix_str("reading blocks")
        blocks = read_gguf_blocks(gguf, manifest.model.num_heads, manifest.model.num_kv_heads)
        model = onnx.load(str(src / B.MODEL), load_external_data=False)
        B.load_weights(model, src)  # (onnx's loader refuses a data file with several hard links)
        bar.update()
        bar.set_postfix_str("rewriting")
        nodes = keep_gguf_blocks(model, blocks, manifest.model.vocab_size, accuracy_level=accuracy_level)
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
