"""Quantize a float32 bundle into a new bundle: named, data-driven recipes over its weight sites.

    from onnxlm.quantize import quantize
    quantize("bundles/smollm2", "bundles/smollm2-int4", recipe="int4")    # -> Path

Recipes (recipes.RECIPES): int8, int4, int4-mixed, fp16. The choices made for every weight are
recorded in the new bundle's manifest (`quantization`).
"""

from __future__ import annotations

from .api import ALGORITHMS, BLOCK_SIZES, QuantizeError, quantize
from .recipes import RECIPES, Recipe, Rule, Site

__all__ = ["quantize", "QuantizeError", "RECIPES", "Recipe", "Rule", "Site", "ALGORITHMS", "BLOCK_SIZES"]
