"""Per family and graph: export a tiny random model, then 32 greedy tokens from onnxlm equal transformers'
`generate`, at batch 1 and at batch 2 with prompts of different lengths (transformers left-pads; the
runtime pads as the bundle's kv_layout needs: left for the plain graph, right for the fused one)."""

from __future__ import annotations

import pytest
from fixtures import TINY, hf_generate, make_hf_folder

import onnxlm
from onnxlm.export.registry import FAMILIES, get_family

NEW_TOKENS = 32
# (model_type, exporter, config overrides): every registered family, variants, and the optimum fallback
CASES = [
    ("llama", "onnxlm", {}),
    ("llama", "onnxlm", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    (
        "llama",
        "onnxlm",
        {
            "num_key_value_heads": 4,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    ("mistral", "onnxlm", {}),
    ("qwen2", "onnxlm", {}),
    ("phi3", "onnxlm", {}),
    ("gpt2", "onnxlm", {}),
    ("gpt2", "onnxlm", {"scale_attn_by_inverse_layer_idx": True}),
    ("bloom", "onnxlm", {}),
    ("opt", "optimum", {}),
]
# the fused graph (GroupQueryAttention over a shared KV buffer) of every family that has one
FUSED = [
    ("llama", "fused", {}),
    ("llama", "fused", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", "fused", CASES[2][2]),  # llama3 rope scaling, 4 KV heads
    ("mistral", "fused", {}),  # sliding window 16: prompt + 32 tokens pass it
    ("qwen2", "fused", {}),
    ("qwen2", "fused", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("phi3", "fused", {}),
    ("phi3", "fused", {"num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.5}),
]
CASES += FUSED


def _id(case):
    model_type, via, overrides = case
    return "-".join([model_type, via, *sorted(overrides)])


def _graph(case):
    return "fused" if case[1] == "fused" else None


def test_every_registered_family_has_a_parity_case():
    tested = {c[0] for c in CASES if c[1] == "onnxlm"}
    registered = {t for types in FAMILIES.values() for t in types}
    assert registered <= tested, f"families without a parity test: {sorted(registered - tested)}"
    assert registered <= set(TINY)
    fused = {t for types in FAMILIES.values() for t in types if "fused" in get_family(t).graphs}
    assert fused <= {c[0] for c in FUSED}, (
        f"fused graphs without a parity test: {sorted(fused - {c[0] for c in FUSED})}"
    )


@pytest.fixture(scope="module", params=CASES, ids=[_id(c) for c in CASES])
def exported(request, tmp_path_factory):
    model_type, via, overrides = request.param
    if via == "optimum":
        pytest.importorskip("optimum.exporters.onnx", reason="optimum-onnx not installed")
    root = tmp_path_factory.mktemp(_id(request.param))
    folder = make_hf_folder(root / "hf", model_type, **overrides)
    graph = _graph(request.param)
    via = "onnxlm" if via == "fused" else via
    bundle = onnxlm.export(folder, root / "bundle", via=via, graph=graph, progress=False)
    engine = onnxlm.load(bundle)
    if graph == "fused":
        assert engine.manifest.io.graph == "fused" and engine.manifest.io.kv_layout == "shared_buffer"
    return folder, engine


PROMPTS = ["The quick brown fox", "Customer service answers questions about orders, refunds and 你好"]


def test_greedy_batch1_equals_transformers(exported):
    folder, engine = exported
    ids = engine.encode_prompt(PROMPTS[0])
    ref = hf_generate(folder, [ids], NEW_TOKENS)[0]
    got = engine.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert got.token_ids == ref
    assert got.finish_reason == "length" and got.usage.completion_tokens == NEW_TOKENS


def test_greedy_batch2_left_padded_equals_transformers(exported):
    folder, engine = exported
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    ref = hf_generate(folder, prompts, NEW_TOKENS)
    got = engine.generate_batch(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in got] == ref
