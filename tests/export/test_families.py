"""Per family and graph: export a tiny random model, then 32 greedy tokens from onnxlm equal transformers'
`generate`, at batch 1 and at batch 2 with prompts of different lengths (transformers left-pads; the
runtime pads as the bundle's kv_layout needs: left for the plain graph, right for the fused one)."""

from __future__ import annotations

import pytest

import onnxlm
from onnxlm.export.registry import FAMILIES, get_family
from tests.fixtures import TINY, hf_generate, make_hf_folder

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
# the families of 2025-26 and the rope scalings: the default export (fused where the family has it), and the
# plain graph of each (slow: the module tests already hold the plain graphs to transformers)
LONGROPE = {  # Phi-4-mini's partial rotary; both test prompts are past the original 4 tokens
    "partial_rotary_factor": 0.75,
    "original_max_position_embeddings": 4,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
        "long_factor": [4.0] * 6,
    },
}
FULL_FACTORS = {"short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0], "long_factor": [4.0] * 8}
NEW = [
    ("qwen3", "fused", {}),
    ("qwen3", "fused", {"tie_word_embeddings": True, "head_dim": 48}),
    ("olmo2", "fused", {}),
    ("granite", "fused", {}),
    ("smollm3", "fused", {}),
    (
        "smollm3",
        "fused",
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2},
    ),
    ("gemma2", "fused", {}),
    ("gemma3_text", "fused", {}),
    (
        "qwen2",
        "fused",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    # dynamic NTK from 24 tokens (the longer prompt's generation crosses it); context 24 * 4; its caches
    # computed at each step
    (
        "llama",
        "fused",
        {"max_position_embeddings": 24, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    ),
    ("phi3", "onnxlm", LONGROPE),  # rotary over 12 channels: plain (GroupQueryAttention wants 16)
    (
        "phi3",
        "fused",
        dict(
            LONGROPE, partial_rotary_factor=1.0, rope_scaling=dict(LONGROPE["rope_scaling"], **FULL_FACTORS)
        ),
    ),
]
CASES += NEW
NEW_PLAIN = [
    (t, "plain", o)
    for t, _, o in NEW
    if t in ("qwen3", "olmo2", "granite", "smollm3", "gemma2", "gemma3_text")
]
PARAMS = CASES + [pytest.param(c, marks=pytest.mark.slow) for c in NEW_PLAIN]


def _id(case):
    model_type, via, overrides = case
    return "-".join([model_type, via, *sorted(overrides)])


def _graph(case):
    return case[1] if case[1] in ("fused", "plain") else None


def test_every_registered_family_has_a_parity_case():
    tested = {c[0] for c in CASES if c[1] != "optimum"}
    registered = {t for types in FAMILIES.values() for t in types}
    assert registered <= tested, f"families without a parity test: {sorted(registered - tested)}"
    assert registered <= set(TINY)
    fused = {t for types in FAMILIES.values() for t in types if "fused" in get_family(t).graphs}
    fused_tested = {c[0] for c in CASES if c[1] == "fused"}
    assert fused <= fused_tested, f"fused graphs without a parity test: {sorted(fused - fused_tested)}"


@pytest.fixture(scope="module", params=PARAMS, ids=[_id(c) for c in CASES + NEW_PLAIN])
def exported(request, tmp_path_factory):
    model_type, via, overrides = request.param
    if via == "optimum":
        pytest.importorskip("optimum.exporters.onnx", reason="optimum-onnx not installed")
    root = tmp_path_factory.mktemp(_id(request.param))
    folder = make_hf_folder(root / "hf", model_type, **overrides)
    graph = _graph(request.param)
    via = "onnxlm" if via in ("fused", "plain") else via
    bundle = onnxlm.export(folder, root / "bundle", via=via, graph=graph, progress=False)
    engine = onnxlm.load(bundle)
    if graph == "fused":
        assert engine.manifest.io.graph == "fused" and engine.manifest.io.kv_layout == "shared_buffer"
    if graph == "plain":
        assert engine.manifest.io.graph == "plain"
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


def test_greedy_under_speculation_equals_transformers(exported):
    """Speculation changes nothing a greedy user sees, in every family and graph: drafts verified
    several tokens a call, some kept and some rejected (rolled back out of the KV cache), and the
    tokens are transformers'. The drafts are scripted (transformers' own continuation with every third
    token wrong) so that both happen whatever a random tiny model writes."""
    from onnxlm.runtime.batch import generate_steps
    from onnxlm.runtime.generate import GenerationParams
    from onnxlm.runtime.speculate import Speculator

    folder, engine = exported
    ids = engine.encode_prompt(PROMPTS[0])
    ref = hf_generate(folder, [ids], NEW_TOKENS)[0]

    class Scripted(Speculator):
        def propose(self, seqs, rows):
            done = len(seqs[0].tokens)
            draft = list(ref[done : done + self.limits(seqs)[0]])
            if len(draft) == 3:
                draft[2] = (draft[2] + 1) % engine.manifest.model.vocab_size
            self.source = "scripted" if draft else None
            return [draft]

    spec = Scripted(k_max=3)
    engine.use_draft("ngram")  # what the engine's drafters are told: where drafts must stop
    spec.exact_until = engine.speculator().exact_until
    engine.use_draft(None)
    assert spec.exact_until == engine.manifest.io.dynamic_rope_from
    params = GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    got = [s.outputs[0].token_id for s in generate_steps(engine.model, None, [ids], params, speculator=spec)]
    assert got == ref
    assert 0 < spec.accepted < spec.drafted  # drafts were kept and rejected
    if spec.exact_until is not None:  # dynamic NTK: drafting stopped where a call would rotate apart
        assert len(ids) + NEW_TOKENS > spec.exact_until
