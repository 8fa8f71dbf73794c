"""Apply a recipe's choices to the weight sites of a graph: pack each weight once, rewrite its nodes.

Sites reading the same initializer (a tied head and embedding) form one group, stored once at the
widest format any of them asks for. A group with an embedding is packed by RTN (or HQQ) whatever the
algorithm: GPTQ needs a MatMul input to calibrate on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import graph as G
from .pack import REMAINDER_CODES, Packed, hqq, min_max_coded, rtn
from .recipes import Site, widest

BITS = {"int4": 4, "int8": 8}


@dataclass
class Settings:
    block_size: int = 32
    scheme: str = "min"  # of 4-bit weights (pack.py); 8-bit ones are sym unless this is asym
    accuracy_level: int = 4
    algorithm: str = "rtn"  # "rtn" | "hqq" | "gptq"
    # how MatMulNBits serves scheme min (pack.py): "folded" (zero points and remainder blocks) or
    # "exact" (the sym kernel plus a correction branch; what GGUF kept blocks use)
    min_form: str = "folded"

    def scheme_for(self, bits: int) -> str:
        return self.scheme if bits == 4 or self.scheme == "asym" else "sym"


@dataclass
class Result:
    nodes: dict[str, str] = field(default_factory=dict)  # node -> format it became
    tied: list[dict] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # node -> why it differs from the plan


def groups(sites: list[Site]) -> dict[tuple[str, bool], list[Site]]:
    """Sites by (weight, orientation): those in one group can share one packed tensor."""
    out: dict[tuple[str, bool], list[Site]] = defaultdict(list)
    for s in sites:
        out[(s.weight, s.stored_kn)].append(s)
    return dict(out)


def plan(sites: list[Site], choose) -> dict[str, str]:
    """node -> format, with every site of a group raised to the group's widest choice."""
    wanted = {s.node: choose(s) for s in sites}
    out = {}
    for group in groups(sites).values():
        fmt = widest([wanted[s.node] for s in group])
        out.update({s.node: fmt for s in group})
    return out


def pack_group(
    w_nk: np.ndarray, bits: int, s: Settings, group: list[Site], hess: dict, result: Result
) -> Packed:
    has_gather = any(x.role == "embedding" for x in group)
    first = group[0]
    scheme = s.scheme_for(bits)
    if coded_head(bits, s, group):
        for x in group:
            result.notes[x.node] = f"block {head_block(s)} with 8-bit coded scales and minimums"
        return min_max_coded(w_nk, bits, head_block(s))
    if s.algorithm == "hqq" and bits == 4:
        return hqq(w_nk, bits, s.block_size)
    if s.algorithm == "gptq" and not has_gather and first.node in hess:
        from .gptq import gptq

        return gptq(w_nk, hess[first.node], bits, s.block_size, scheme)
    if s.algorithm != "rtn" and bits == 4:
        why = "embedding shares it" if has_gather else "no calibration input"
        for x in group:
            result.notes[x.node] = f"rtn ({s.algorithm} not applicable: {why})"
    return rtn(w_nk, bits, s.block_size, scheme)


def coded_head(bits: int, s: Settings, group: list[Site]) -> bool:
    """The output head / tied embedding is what 4-bit costs most on (SmolLM2: all but ~0.5% of the
    perplexity int4 min adds): with RTN and scheme min it gets half the block size for the same bytes,
    its scales and minimums fitted as 8-bit codes. Measured on SmolLM2 (en / zh perplexity vs fp32):
    block 32 float16 +6.8% / +9.1%, block 16 coded +3.9% / +6.5%, at 84.2 MB both while scales were
    stored as float16. Stored as the float32 the kernels read (quantize/graph.py) it costs what 8 bits
    do, so the int4 recipe now keeps the head at 8 bits under scheme min (recipes.py); this form
    remains for a 4-bit head or embedding a recipe still asks for (an untied embedding, `auto`)."""
    return (
        bits == 4
        and s.scheme == "min"
        and s.algorithm == "rtn"
        and any(x.role in ("head", "embedding") for x in group)
        and head_block(s) < s.block_size
    )


def head_block(s: Settings) -> int:
    return max(16, s.block_size // 2)


def apply(
    model: onnx.ModelProto,
    sites: list[Site],
    formats: dict[str, str],
    settings: Settings,
    hessians: dict[str, np.ndarray] | None = None,
    progress=None,
) -> Result:
    """Rewrite the graph in place. `hessians` (GPTQ) maps a site's node name to its input's Hessian."""
    inits = G.initializers(model)
    by_name = {n.name: n for n in model.graph.node}
    replacements: dict[str, list] = {}
    prelude: list = []  # constant-only nodes: Casts of float16 scales, min offsets
    block_sums = G.BlockSums(model)
    result = Result()
    for (weight, _), group in groups(sites).items():
        fmt = formats[group[0].node]
        gathers = [x for x in group if x.role == "embedding"]
        if gathers and fmt != "fp32" and group[0].k % settings.block_size:
            for x in gathers:  # GatherBlockQuantized cannot drop a padded tail block
                result.notes[x.node] = (
                    f"fp32 (hidden {x.k} is not a multiple of block size {settings.block_size})"
                )
                result.nodes[x.node] = "fp32"
            group = [x for x in group if x.role != "embedding"]
            gathers = []
        if fmt == "fp32" or not group:
            result.nodes.update({x.node: "fp32" for x in group})
            if progress:
                progress.update(len(group))
            continue
        w = G.weight_nk(inits[weight], group[0])  # (N, K)
        packed = pack_group(w, BITS[fmt], settings, group, hessians or {}, result)
        names = G.PackedNames(
            model,
            weight,
            packed,
            gather_only=len(gathers) == len(group),
            gathered=bool(gathers),
            fold=REMAINDER_CODES if settings.min_form == "folded" else 0,
        )
        prelude += names.nodes
        for x in group:
            node = by_name[x.node]
            if x.role == "embedding":
                replacements[x.node] = G.gather_block_quantized(node, names)
            else:
                replacements[x.node] = G.matmul_nbits(
                    model, node, x, names, settings.accuracy_level, block_sums
                )
            result.nodes[x.node] = fmt
            if progress:
                progress.update(1)
        if len(group) > 1:
            result.tied.append(
                {"weight": weight, "nodes": [x.node for x in group], "format": fmt, "stored_once": True}
            )
    G.replace_nodes(model, replacements, prelude)
    G.drop_unused_initializers(model)
    G.ensure_ms_opset(model)
    return result
