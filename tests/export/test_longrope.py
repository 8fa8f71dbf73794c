"""Long RoPE (phi3 `longrope`) across the original context: a prompt below original_max_position_embeddings
whose generation crosses it, and one already past it, token for token with transformers, per row.

transformers' Phi3ForCausalLM.prepare_inputs_for_generation drops the cache at the step whose length
first reaches original + 1 and runs the whole sequence again, the long factors throughout (its rotary
takes them once max(position_ids) + 1 > original). Under transformers 5 `generate` is exactly that, and
it equals a greedy loop that runs the whole sequence through the model at every step. transformers 4.x
passes a one-element cache_position with that re-run, so its mask lets the re-run attend both ways (a
bug fixed in 5): under 4.x the reference is the whole-sequence loop, the semantics 5's generate has.

Batched transformers switches the whole padded batch with its longest row; onnxlm switches each row on
its own, so every row of a batch equals transformers run on that row alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import transformers

import onnxlm
from onnxlm.runtime.driver import make_rows
from tests.fixtures import hf_generate, load_hf_model, make_hf_folder

NEW_TOKENS = 32
ORIGINAL = 32  # original_max_position_embeddings: a 20-token prompt crosses it after 13 new tokens
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _longrope(rot: int) -> dict:
    return {
        "original_max_position_embeddings": ORIGINAL,
        "max_position_embeddings": 128,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0][: rot // 2],
            "long_factor": [8.0] * (rot // 2),
        },
    }


# variant -> config overrides: rotary over the whole head (16), over half of a 32-wide head (Phi-4-mini's
# partial rotary, 16 channels), over 12 of 16 (fewer than GroupQueryAttention's caches take: plain only)
VARIANTS = {
    "full": _longrope(16),
    "partial": dict(_longrope(16), num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5),
    "partial12": dict(_longrope(12), partial_rotary_factor=0.75),
}
# (variant, graph, long_decode_from): the fused graph also with its MatMul decode form from 8 tokens
CASES = [
    ("full", "fused", None),
    ("full", "plain", None),
    ("full", "fused", 8),
    ("partial", "fused", None),
    ("partial12", "plain", None),
]


def _id(case) -> str:
    variant, graph, long_decode = case
    return f"{variant}-{graph}" + (f"-long-decode{long_decode}" if long_decode else "")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    return {name: make_hf_folder(root / name, "phi3", **over) for name, over in VARIANTS.items()}


@pytest.fixture(scope="module", params=CASES, ids=[_id(c) for c in CASES])
def case(request, folders, tmp_path_factory):
    variant, graph, long_decode = request.param
    out = tmp_path_factory.mktemp(_id(request.param)) / "bundle"
    bundle = onnxlm.export(folders[variant], out, graph=graph, long_decode_from=long_decode, progress=False)
    engine = onnxlm.load(bundle)
    assert engine.manifest.io.graph == graph
    return folders[variant], engine


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(5, 300, n).tolist()


PROMPTS = {n: prompt(n, n) for n in (20, 31, 32, 40)}  # below (crosses after 13, 2, 1 tokens) and past


def whole_sequence_greedy(folder, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens of transformers' model run over the whole sequence at each step (no cache)."""
    import torch

    model, seq = load_hf_model(folder), list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids) :]


_REFS: dict = {}


def reference(folder, ids: list[int]) -> list[int]:
    """transformers on this one sequence: its generate under 5.x, the whole-sequence loop under 4.x."""
    key = (str(folder), tuple(ids))
    if key not in _REFS:
        run = hf_generate if TRANSFORMERS_5 else lambda f, p, n: [whole_sequence_greedy(f, p[0], n)]
        _REFS[key] = run(folder, [ids], NEW_TOKENS)[0]
    return _REFS[key]


def test_manifest_says_where_rows_switch(case):
    _, engine = case
    io = engine.manifest.io
    assert (io.long_rope, io.long_rope_after) == ("long_rope", ORIGINAL)
    assert io.long_rope in {i.name for i in engine.model.session.get_inputs()}


@pytest.mark.parametrize("n", sorted(PROMPTS))
def test_batch1_equals_transformers(case, n):
    folder, engine = case
    got = engine.generate(PROMPTS[n], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert got.token_ids == reference(folder, PROMPTS[n])


def test_batch_rows_each_equal_transformers_alone(case):
    folder, engine = case
    for lengths in ((20, 40), (31, 20, 32)):
        prompts = [PROMPTS[n] for n in lengths]
        got = engine.generate_batch(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [c.token_ids for c in got] == [reference(folder, p) for p in prompts], lengths


def test_ngram_speculation_across_the_switch(case):
    """Prompt lookup drafts on a repetitive prompt: greedy output stays transformers'."""
    folder, engine = case
    ids = (PROMPTS[20][:6] * 4)[:23]
    engine.use_draft("ngram")
    try:
        got = engine.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    finally:
        engine.use_draft(None)
    assert got.token_ids == reference(folder, ids)


def _rows(engine, prompts):
    rows = make_rows(engine.model)
    job = rows.start(prompts)
    job.run()
    rows.join(job)
    return rows


def test_driver_splits_a_multi_token_decode_and_rolls_back_under_the_switch(case):
    """Eight tokens in one call across the switch (a draft run) give the logits of eight one-token calls;
    a rollback back under the switch, then the same tokens again, gives them once more. The other row is
    past the switch from the start."""
    _, engine = case
    base, other = prompt(28, 28), PROMPTS[40]
    toks = prompt(8, 1)
    rows = _rows(engine, [base, other])
    single = np.stack([rows.decode([[t], [t]])[0, 0] for t in toks])  # (8, vocab): crosses at the 5th
    rows.free()
    rows = _rows(engine, [base, other])
    multi = rows.decode([toks, [toks[0]]])
    np.testing.assert_allclose(multi[0], single, atol=1e-4)
    assert rows.held(0) == 36 and rows.history[0] == base + toks
    rows.rollback(0, 6)  # 30 tokens: short factors again
    again = np.stack([rows.decode([[t], [t]])[0, 0] for t in toks[2:]])
    np.testing.assert_allclose(again, single[2:], atol=1e-4)
    rows.free()
