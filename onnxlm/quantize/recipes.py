"""Named, data-driven quantization recipes: ordered rules over the graph's weight sites.

A *site* is one node that reads a constant 2-D float weight: a MatMul (or a Gemm with a constant B,
the output head) or the token-embedding Gather. A recipe maps each site to a format — "int4",
"int8" or "fp32" (left alone) — by its first matching rule, else its default (mlx-lm's
quant_predicate, as data). The rules are written into the manifest with the per-node results.

    recipe = RECIPES["int4-mixed"]
    recipe.choose(site)   # -> "int8" for the head, "int4" for most MatMuls

A rule may hold only under some 4-bit schemes or MatMulNBits accuracy levels (`schemes`,
`accuracy_levels`): the choice is made with the settings the weights are packed for
(`recipe.choose(site, scheme, accuracy_level)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

FORMATS = ("int4", "int8", "fp32")
V_PROJ = ("v_proj", "value", "qkv_proj", "query_key_value", "c_attn", "Wqkv")  # v alone, or fused with q, k
_PRECISION = {"int4": 0, "int8": 1, "fp32": 2}
_LAYER = re.compile(r"(?:^|/)(?:layers|layer|h|blocks|block)\.(\d+)(?:/|$)")


@dataclass(frozen=True)
class Site:
    """A node that reads a constant weight, with the facts rules look at."""

    node: str  # node name, as in the graph
    op: str  # "MatMul" | "Gemm" | "Gather"
    role: str  # "linear" | "head" | "embedding"
    weight: str  # initializer name
    n: int  # outputs (vocab for the head and the embedding)
    k: int  # inputs (hidden for the head and the embedding)
    layer: int | None  # decoder layer index, parsed from the node name
    proj: str | None  # the scope right above the op, e.g. "q_proj", "down_proj", "c_attn"
    num_layers: int
    hidden_size: int
    stored_kn: bool = False  # the initializer is (K, N) (a MatMul's B), not (N, K)
    bias: str | None = None  # a Gemm's C input, if any

    @property
    def is_mlp_down(self) -> bool:
        """The MLP's output projection (intermediate -> hidden), whatever the family calls it."""
        return (
            self.role == "linear"
            and self.layer is not None
            and self.n == self.hidden_size
            and self.k > self.n
        )

    @property
    def more_bits_layer(self) -> bool:
        """llama.cpp's Q4_K_M choice of layers whose attn_v / ffn_down get more bits: the first and
        last eighth, and every third layer between (14 of SmolLM2's 30)."""
        n, i = self.num_layers, self.layer
        return i is not None and (i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2)


def parse_scope(node_name: str) -> tuple[int | None, str | None]:
    """("/layers.3/self_attn/v_proj/MatMul") -> (3, "v_proj")."""
    m = _LAYER.search(node_name)
    parts = [p for p in node_name.split("/") if p]
    return (int(m.group(1)) if m else None), (parts[-2] if len(parts) >= 2 else None)


@dataclass(frozen=True)
class Rule:
    what: str  # written to the manifest
    when: Callable[[Site], bool]
    becomes: str
    schemes: tuple[str, ...] | None = None  # the 4-bit schemes under which the rule holds (None: all)
    accuracy_levels: tuple[int, ...] | None = None  # the accuracy levels under which it holds (None: all)

    def holds(self, scheme: str, accuracy_level: int) -> bool:
        return (self.schemes is None or scheme in self.schemes) and (
            self.accuracy_levels is None or accuracy_level in self.accuracy_levels
        )


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    default: str  # format of a site no rule matches; "float16" for the fp16 recipe
    rules: tuple[Rule, ...] = ()
    dtype: str = "int4"  # manifest.dtype of the result

    def choose(self, site: Site, scheme: str = "min", accuracy_level: int = 4) -> str:
        """The format of `site` when 4-bit weights are packed in `scheme` for `accuracy_level`."""
        for rule in self.rules:
            if rule.holds(scheme, accuracy_level) and rule.when(site):
                return rule.becomes
        return self.default

    def describe(self, scheme: str = "min", accuracy_level: int = 4) -> list[dict[str, str]]:
        """The rules that hold under these settings, as the manifest records them."""
        held = [r for r in self.rules if r.holds(scheme, accuracy_level)]
        return [{"what": r.what, "becomes": r.becomes} for r in held] + [
            {"what": "every other weight", "becomes": self.default}
        ]


def widest(formats: list[str]) -> str:
    """One weight read by several sites (a tied head and embedding) is stored once, at the widest format."""
    return max(formats, key=_PRECISION.__getitem__)


KV_CACHES = ("float32", "float16", "int8")  # the fused graph's cache types (kv.py)
KV_CHOICES = ("auto", *KV_CACHES)  # what quantize takes: auto picks per recipe (api.auto_kv_cache)
SCHEMES = ("min", "sym", "asym")  # 4-bit block forms (pack.py): scale + float minimum, scale, scale + zero

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # int8 = MatMulNBits bits=8, accuracy level 4, measured on SmolLM2-135M (CPU, 2 shared cores;
        # perplexity on the Apache-2.0 text, fp32 18.20, decode step 40 ms at 256 past):
        #   MatMulNBits 8-bit, level 4: 18.28 (+0.4%), 151 MB, ~24 ms/step
        #   MatMulNBits 8-bit, level 0: 18.28, ~340 ms/step (no fast 8-bit float kernel)
        #   quantize_dynamic (MatMulInteger, per-channel): 34.0 (+87%), 248 MB (embedding stays fp32,
        #   the tied head gets its own int8 copy), ~19 ms/step
        Recipe(
            "int8",
            "8-bit weight-only MatMulNBits (block-wise), embedding via GatherBlockQuantized",
            default="int8",
            dtype="int8",
        ),
        # The output head (and the embedding tied to it) at 8 bits under scheme min: min's 4-bit head
        # needs block 16 with coded scales and minimums to stay near the float model (pack.py), and
        # with every scale stored as the float32 the kernels read that is as many bytes as 8 bits.
        # Measured on SmolLM2-135M (2026-12-04; perplexity en / zh vs fp32, weights, peak RSS
        # generating): coded 4-bit head +4.2% / +6.5%, 116.4 MB, 243 MB; 8-bit head +0.28% / +0.79%,
        # 110.6 MB, 245 MB; decode the same within noise (time a token 8-bit / coded: 0.92-1.10, median
        # 0.97, over 12 processes each running one bundle; 1.02-1.04 interleaved in one process).
        # Schemes sym and asym keep a 4-bit block-32 head: there 8 bits cost ~1.8x its bytes and time,
        # for little of what those schemes lose (their body's rounding). So do accuracy levels below 4:
        # onnxruntime has no fast float-compute 8-bit kernel (SmolLM2's head at level 0 or 1: 109 ms a
        # call at 8 bits against 1.1 ms at 4; at level 4 0.46 against 0.43 ms).
        Recipe(
            "int4",
            "4-bit weight-only MatMulNBits (the output head at 8 bits with scheme min at accuracy level 4), "
            "embedding via GatherBlockQuantized",
            default="int4",
            dtype="int4",
            rules=(
                Rule(
                    "output head (a tied embedding follows it), with 4-bit scheme min at accuracy level 4",
                    lambda s: s.role == "head",
                    "int8",
                    schemes=("min",),
                    accuracy_levels=(4,),
                ),
            ),
        ),
        # Measured on SmolLM2-135M with sym int4 (KL vs fp32 over 512 tokens when only that group is
        # int4): down_proj 0.13, v_proj 0.11, head+embedding 0.10, up 0.075, gate 0.04, o 0.03, q 0.02,
        # k 0.02. With the default scheme min (perplexity on the built-in en / zh texts): int4 +6.8% /
        # +9.1% (84 MB), these rules +0.3% / +0.5% (105 MB), nearly all of it from the head at 8 bits.
        Recipe(
            "int4-mixed",
            "int4, with the most sensitive weights kept at 8 bits (llama.cpp Q4_K_M's layer choice)",
            default="int4",
            dtype="int4",
            rules=(
                Rule("output head (a tied embedding follows it)", lambda s: s.role == "head", "int8"),
                Rule(
                    "MLP down projection in the first/last eighth of layers and every third between",
                    lambda s: s.is_mlp_down and s.more_bits_layer,
                    "int8",
                ),
                Rule(
                    "value projection in the same layers (the whole q|k|v MatMul where they are fused)",
                    lambda s: s.proj in V_PROJ and s.more_bits_layer,
                    "int8",
                ),
            ),
        ),
        Recipe(
            "fp16",
            "float16 weights and compute for GPU providers; numerically fragile nodes stay float32",
            default="float16",
            dtype="float16",
        ),
    )
}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):  # a recipe built on the fly (e.g. `auto`'s steps)
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None
