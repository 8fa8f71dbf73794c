"""Quantize a float32 bundle into a new bundle: named, data-driven recipes over its weight sites.

    from onnxlm.quantize import quantize
    quantize("bundles/smollm2", "bundles/smollm2-int4", recipe="int4")    # -> Path

Recipes (recipes.RECIPES): int8, int4, int4-mixed, fp16; and two built on them by
report.quantize_with_report (which also measures the result against its source): auto (int4, raising
sensitive weights to int8 until a perplexity budget holds) and gguf (the source GGUF's own Q4_1 / Q8_0
blocks, gguf_blocks.py). All six are CHOICES. The choices made for every weight are recorded in the new
bundle's manifest (`quantization`). kv_cache (kv.py) gives the fused graph a float16 or int8 KV cache. Paths in, a bundle out: nothing here fetches.
"""

from __future__ import annotations

from .api import ALGORITHMS, BLOCK_SIZES, QuantizeError, quantize
from .recipes import KV_CACHES, KV_CHOICES, RECIPES, SCHEMES, Recipe, Rule, Site

CHOICES = (*RECIPES, "auto", "gguf")  # every recipe name quantize_with_report (and the CLI) takes

__all__ = [
    "quantize",
    "QuantizeError",
    "RECIPES",
    "CHOICES",
    "Recipe",
    "Rule",
    "Site",
    "ALGORITHMS",
    "BLOCK_SIZES",
    "SCHEMES",
    "KV_CACHES",
    "KV_CHOICES",
]
