"""The quantize recipes on the new families' bundles: int8 and int4 load and generate greedy tokens the
float32 model ranks near the top; a soft-capped head stays soft-capped (quantized logits within the cap)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxlm import bundle as B
from onnxlm.quantize import quantize
from onnxlm.runtime import load
from tests.quantize.test_quantize import full_logits

FAMILIES = ["qwen3", "olmo2", "granite", "smollm3", "gemma2", "gemma3_text"]
PROMPT = "Customer service answers questions about"
CAP = 10.0  # fixtures.TINY["gemma2"]'s final_logit_softcapping


@pytest.mark.parametrize("recipe", ["int8", "int4"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantized_family_generates_tokens_the_reference_ranks_high(
    conditioned, tmp_path, model_type, recipe
):
    src = conditioned(model_type)
    out = quantize(src, tmp_path / recipe, recipe, progress=False)
    engine = load(out)
    assert engine.manifest.quantization and engine.manifest.io.graph == B.read_manifest(src).io.graph
    ids = engine.encode_prompt(PROMPT)
    gen = engine.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids
    rows = full_logits(src, ids + gen)[len(ids) - 1 : len(ids) - 1 + len(gen)]  # teacher-forced on ours
    ranks = [int((row > row[t]).sum()) for row, t in zip(rows, gen, strict=True)]
    assert max(ranks) < 10 and sum(r >= 5 for r in ranks) <= 1, f"{recipe} {model_type}: ranks {ranks}"


@pytest.mark.parametrize("recipe", ["int4", "fp16"])
def test_soft_capped_head_stays_capped(conditioned, tmp_path, recipe):
    """The head's MatMul is quantized (or float16) but the cap after it stays: the logits within ±cap
    however far the head's rounding moves them."""
    out = quantize(conditioned("gemma2"), tmp_path / recipe, recipe, progress=False)
    graph = onnx.load(str(out / B.MODEL), load_external_data=False).graph
    tanh = [n for n in graph.node if n.op_type == "Tanh"]
    assert tanh, "the final soft-cap is gone"
    logits = full_logits(out, load(out).encode_prompt(PROMPT))
    assert np.isfinite(logits).all() and np.abs(logits).max() <= CAP + 1e-3
    assert np.abs(logits).max() > CAP / 2  # the cap is active on these logits, not idle
