"""The quantize recipes on the new families' bundles: int8 and int4 load and generate greedy tokens the
float32 model ranks near the top; a soft-capped head stays soft-capped (quantized logits within the cap)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures import make_hf_folder
from test_quantize import full_logits

from onnxlm import bundle as B
from onnxlm.export.convert import export
from onnxlm.quantize import quantize
from onnxlm.runtime import load

FAMILIES = ["qwen3", "olmo2", "granite", "smollm3", "gemma2", "gemma3_text"]
PROMPT = "Customer service answers questions about"
CAP = 10.0  # fixtures.TINY["gemma2"]'s final_logit_softcapping


def conditioned(path: Path, model_type: str) -> Path:
    """A tiny model that tolerates weight noise like a trained one (see test_quantize.conditioned_folder):
    linear weights N(0, 1/fan_in) instead of make_hf_folder's chaotic N(0, 0.3), an untied head the
    embedding plus a little noise."""
    from safetensors.numpy import load_file, save_file

    folder = make_hf_folder(path, model_type)
    tensors = load_file(folder / "model.safetensors")
    for name, w in tensors.items():
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            tensors[name] = (w / np.sqrt(w.shape[1]) / 0.3).astype(w.dtype)  # (out, in)
    if "lm_head.weight" in tensors:
        noise = np.random.default_rng(0).normal(0, 0.03, tensors["lm_head.weight"].shape)
        tensors["lm_head.weight"] = (tensors["model.embed_tokens.weight"] + noise).astype(np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("fq")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            folder = conditioned(root / f"hf-{model_type}", model_type)
            cache[model_type] = export(folder, root / model_type, progress=False)
        return cache[model_type]

    return get


@pytest.mark.parametrize("recipe", ["int8", "int4"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantized_family_generates_tokens_the_reference_ranks_high(ref, tmp_path, model_type, recipe):
    src = ref(model_type)
    out = quantize(src, tmp_path / recipe, recipe, progress=False)
    engine = load(out)
    assert engine.manifest.quantization and engine.manifest.io.graph == B.read_manifest(src).io.graph
    ids = engine.encode_prompt(PROMPT)
    gen = engine.generate(ids, max_new_tokens=12, ignore_eos=True).token_ids
    rows = full_logits(src, ids + gen)[len(ids) - 1 : len(ids) - 1 + len(gen)]  # teacher-forced on ours
    ranks = [int((row > row[t]).sum()) for row, t in zip(rows, gen, strict=True)]
    assert max(ranks) < 10 and sum(r >= 5 for r in ranks) <= 1, f"{recipe} {model_type}: ranks {ranks}"


@pytest.mark.parametrize("recipe", ["int4", "fp16"])
def test_soft_capped_head_stays_capped(ref, tmp_path, recipe):
    """The head's MatMul is quantized (or float16) but the cap after it stays: the logits within ±cap
    however far the head's rounding moves them."""
    out = quantize(ref("gemma2"), tmp_path / recipe, recipe, progress=False)
    graph = onnx.load(str(out / B.MODEL), load_external_data=False).graph
    tanh = [n for n in graph.node if n.op_type == "Tanh"]
    assert tanh, "the final soft-cap is gone"
    logits = full_logits(out, load(out).encode_prompt(PROMPT))
    assert np.isfinite(logits).all() and np.abs(logits).max() <= CAP + 1e-3
    assert np.abs(logits).max() > CAP / 2  # the cap is active on these logits, not idle
