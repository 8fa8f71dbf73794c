"""An int8 cache's graph run as its two forms (runtime/split.py) over onnxruntime's C API (runtime/ortc.py):
every output is the If graph's, on every driver path, and both forms use the same weights."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxlm
from onnxlm import bundle as B
from onnxlm.quantize import quantize
from onnxlm.quantize.kv import FLOAT_PREFILL_FROM
from onnxlm.runtime import ortc, split
from onnxlm.runtime import session as S

pytestmark = pytest.mark.skipif(not ortc.available(), reason="no onnxruntime C library in this wheel")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "Our HR team answers",
    "Leave requests go to your manager first; HR answers questions about pay, leave and benefits.",
    "客服回答问题",
]


@pytest.fixture(scope="module")
def int8(conditioned, tmp_path_factory):
    """An int4-recipe bundle of the conditioned tiny llama with an int8 cache (an If per layer)."""
    return quantize(
        conditioned("llama"), tmp_path_factory.mktemp("split") / "q", "int4", kv_cache="int8", progress=False
    )


def greedy(engine, prompt, n=24):
    return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids


def ops(graph: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(graph).graph.node]


def test_forms_have_no_if_and_one_attention_per_layer(int8):
    layers = B.read_manifest(int8).model.num_layers
    model = split.read_graph(int8 / B.MODEL)
    assert split.splits(model)
    for branch in (split.DECODE, split.PREFILL):
        form = onnx.load_from_string(split.cut(model, branch).SerializeToString())
        kinds = [n.op_type for n in form.graph.node]
        assert "If" not in kinds and kinds.count("GroupQueryAttention") == layers
        int8_nodes = [
            n for n in form.graph.node if any(a.name == "kv_cache_bit_width" for a in n.attribute)
        ]  # the decode form keeps the int8 node, the prefill form's attention is float32
        assert len(int8_nodes) == (layers if branch == split.DECODE else 0)
        names = {t.name for t in form.graph.initializer}
        assert {i for n in form.graph.node for i in n.input if i in names} == names  # none left unread


@pytest.mark.parametrize("shrink_from", [split.SHRINK_FROM, 8])
def test_split_gives_the_if_graphs_outputs(int8, shrink_from, monkeypatch):
    """(shrink_from 8: the prefill call runs with arena shrinkage, which changes no output.)"""
    monkeypatch.setattr(split, "SHRINK_FROM", shrink_from)
    plain, forms = onnxlm.load(int8, split_forms=False), onnxlm.load(int8, split_forms=True)
    assert isinstance(forms.model.session, split.SplitSession)
    assert not isinstance(plain.model.session, split.SplitSession)
    a, b = plain.model, forms.model
    n = FLOAT_PREFILL_FROM + 9  # the prefill form
    ids = np.array([[a.facts.bos_token_id or 1, *range(30, 30 + n - 1)]])
    caches = [m.new_cache(1, capacity=n + 8) for m in (a, b)]
    every = np.arange(n)[None]
    np.testing.assert_array_equal(
        a.step(ids, np.array([n]), every, caches[0]), b.step(ids, np.array([n]), every, caches[1])
    )
    for token in (42, 7, 99):  # decode steps on what the prefill stored
        steps = [
            m.step(np.array([[token]]), np.array([1]), np.array([[0]]), c)
            for m, c in zip((a, b), caches, strict=True)
        ]
        np.testing.assert_array_equal(*steps)
    for x, y in zip(caches[0].read(0), caches[1].read(0), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [greedy(forms, p) for p in PROMPTS] == [greedy(plain, p) for p in PROMPTS]


def test_every_driver_path_on_the_split_forms(int8):
    """Batches (a long and short prompts in one call: the prefill form for all), speculation (verifies
    stay on the decode form), prefix reuse and the numpy path give the If graph's tokens."""
    plain = onnxlm.load(int8, split_forms=False)
    singles = [greedy(plain, p) for p in PROMPTS]
    forms = onnxlm.load(int8, split_forms=True)
    batch = forms.generate_batch(PROMPTS, max_new_tokens=24, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in batch] == singles
    spec = onnxlm.load(int8, draft="ngram", split_forms=True)
    assert [greedy(spec, p) for p in PROMPTS] == singles
    numpy_path = onnxlm.load(int8, io_binding=False, split_forms=True)
    assert isinstance(numpy_path.model.session, split.SplitSession)
    assert [greedy(numpy_path, p) for p in PROMPTS] == singles
    chat = [{"role": "user", "content": "Our HR team answers questions about leave and pay."}]
    first = forms.chat(chat, max_new_tokens=8, temperature=0, ignore_eos=True)
    turn2 = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And pay?"}]
    again = forms.chat(turn2, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert again.usage.cached_tokens > 0
    assert again.token_ids == plain.chat(turn2, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids


def test_a_prompts_logits_do_not_depend_on_its_chunks(int8):
    """A prompt longer than float_prefill_above takes the float32 form in every chunk, a last chunk of a
    few tokens included: the server sizes chunks by its load, and a load must not change an answer.
    Prompts of at most that many tokens stay on the decode form."""
    from onnxlm.runtime.driver import SharedRows

    engine = onnxlm.load(int8, split_forms=True)
    above = engine.manifest.io.float_prefill_above
    prompt = list(range(40, 40 + 3 * above + 5))

    def last_logits(chunk, prompts=(prompt,)):
        job = SharedRows(engine.model, chunk=chunk).start(list(prompts))
        try:
            return job.run().copy(), job.float_form
        finally:
            job.free()

    whole, forced = last_logits(None)
    assert forced
    # last chunks of 3, above + 5, 2 and 1 token(s), and chunks of 1: onnxruntime computes a row's call
    # of one token by other kernels, so no call brings a row a single token (driver.chunk_end)
    for chunk in (len(prompt) - 3, 2 * above, above + 1, len(prompt) - 1, 1):
        np.testing.assert_array_equal(last_logits(chunk)[0], whole)
    assert not last_logits(None, [prompt[:above]])[1]
    other = list(range(300, 300 + 2 * above))  # a batchmate at whose chunk end `prompt` has one left
    pair, _ = last_logits(len(prompt) - 1, [other, prompt])
    np.testing.assert_array_equal(pair[1], whole[0])
    np.testing.assert_array_equal(pair[0], last_logits(None, [other])[0][0])


def test_a_short_prompts_logits_do_not_depend_on_its_batchmates(int8):
    """Prompts of at most float_prefill_above tokens and longer ones admitted together are
    prefilled apart, each kind on its own form, and come back in the given order: every row's logits
    and KV are what it gets alone."""
    from onnxlm.runtime.driver import SharedRows, SplitPrefill

    engine = onnxlm.load(int8, split_forms=True)
    above = engine.manifest.io.float_prefill_above
    prompts = [list(range(50, 50 + 2 * above)), [7, 8, 9], list(range(90, 90 + above + 3)), [11] * above]

    def run(batch):
        job = SharedRows(engine.model, chunk=above + 4).start(batch)
        return job, job.run().copy()

    job, together = run(prompts)
    assert isinstance(job, SplitPrefill)
    for row, p in enumerate(prompts):
        alone, logits = run([p])
        np.testing.assert_array_equal(together[row], logits[0])
        for x, y in zip(job.cache.read(row), alone.cache.read(0), strict=True):
            np.testing.assert_array_equal(x, y)
        alone.free()
    job.free()
    batch = engine.generate_batch([PROMPTS[0], PROMPTS[1]], max_new_tokens=8, temperature=0)
    assert [c.token_ids for c in batch] == [greedy(engine, p, 8) for p in PROMPTS[:2]]


def test_a_row_bringing_fewer_tokens_fits_the_float_form(int8):
    """One float32-form call, a row holding much and bringing a few tokens (a next turn) beside a row
    bringing more (a new prompt): the float32 GroupQueryAttention keeps total_sequence_length
    positions for every row's padded chunk, so the total is the fullest row plus the chunk's width
    (it was the longest row after the call, and the kernel refused)."""
    from onnxlm.runtime.driver import SharedRows
    from onnxlm.runtime.prefix import Hit

    engine = onnxlm.load(int8, split_forms=True)
    above = engine.manifest.io.float_prefill_above
    long, new = list(range(30, 30 + 3 * above + 10)), list(range(200, 200 + 2 * above + 5))

    def alone(prompt):
        job = SharedRows(engine.model, chunk=None).start([prompt])
        try:
            return job.run()[0].copy(), job.cache.read(0)
        finally:
            job.free()

    (want_long, kv), (want_new, _) = alone(long), alone(new)
    n = len(long) - above - 2  # the next turn brings above + 2 tokens, the new prompt more
    job = SharedRows(engine.model, chunk=None).start([long, new], [Hit(n, [a[:, :n] for a in kv]), None])
    assert job.float_form
    last = job.run()
    np.testing.assert_array_equal(last[0], want_long)
    np.testing.assert_array_equal(last[1], want_new)
    job.free()


def test_a_partial_hit_gives_what_a_cold_prefill_gives(int8):
    """The rest of a prompt longer than float_prefill_above after a cached prefix takes the float32
    form however few tokens it brings (a next turn of a chat, a shared system prompt), as the cold
    prefill did: how much of a prompt the prefix cache held changes no logit. It took the decode form
    when at most float_prefill_above tokens were left."""
    from onnxlm.runtime.driver import SharedRows
    from onnxlm.runtime.prefix import Hit, PrefixCache

    engine = onnxlm.load(int8, split_forms=True)
    above = engine.manifest.io.float_prefill_above
    prompt = list(range(30, 30 + 3 * above + 10))

    def run(reuse=None):
        job = SharedRows(engine.model, chunk=above + 3).start([prompt], [reuse])
        try:
            return job.run()[0].copy(), job.cache.read(0)
        finally:
            job.free()

    cold, kv = run()
    for left in (2, 5, above, above + 3):
        n = len(prompt) - left
        np.testing.assert_array_equal(run(Hit(n, [a[:, :n] for a in kv]))[0], cold)
    cache = PrefixCache(min_tokens=4)
    cache.store(prompt[:-1] + [7], [a[:, : len(prompt)] for a in kv], exact=len(prompt) - 1)
    hit = cache.lookup(prompt)  # shares all but the last token: two are left, a call of one would differ
    assert hit.n == len(prompt) - 2 and hit.as_cold
    np.testing.assert_array_equal(run(hit)[0], cold)
    # a prefix whose later positions decode steps computed (a chat's answer): a short rest takes the
    # decode form, faster, since no form would give the cold prefill's logits there
    n = len(prompt) - 5
    job = SharedRows(engine.model).start([prompt], [Hit(n, [a[:, :n] for a in kv], exact=n - 10)])
    assert not job.float_form
    job.free()


def test_a_prompt_answers_alike_whatever_the_prefix_cache_held(int8):
    """Two requests over one system prompt that differ in their last few tokens: the second reuses the
    first's prompt positions and answers as it does on a fresh engine, greedy token for token with
    the same logprobs (the serve_load next turn that answered otherwise alone than under load)."""
    system = {"role": "system", "content": "Answer from this handbook only. " + PROMPTS[1] * 3}

    def ask(engine, i):
        msgs = [system, {"role": "user", "content": f"Question {i}"}]
        c = engine.chat(msgs, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
        return c.token_ids, c.logprobs, c.usage.cached_tokens

    fresh = ask(onnxlm.load(int8, split_forms=True), 21)
    engine = onnxlm.load(int8, split_forms=True)
    ask(engine, 28)
    again = ask(engine, 21)
    prompt = engine.encode_prompt(engine.render_chat([system, {"role": "user", "content": "Question 21"}]))
    assert 0 < len(prompt) - again[2] <= engine.manifest.io.float_prefill_above  # a short rest
    assert again[:2] == fresh[:2]


def test_both_forms_use_one_copy_of_the_weights(int8):
    session = onnxlm.load(int8, split_forms=True).model.session
    external = {
        t.name
        for form in (split.cut(split.read_graph(int8 / B.MODEL), b) for b in (split.DECODE, split.PREFILL))
        for t in form.graph.initializer
        if t.data_location == B.EXTERNAL
    }
    assert set(session.initializers) == external  # every weight handed to both sessions, mapped once
    assert session.decode.initializers is session.prefill.initializers
    assert session.decode.container is session.prefill.container
    ranges = S.file_ranges(int8)  # views of one read-only mapping of the data file, not copies
    inside = [
        [i for i, (start, end) in enumerate(ranges) if start <= v.keep.ctypes.data < end]
        for v in session.initializers.values()
    ]
    assert all(len(found) == 1 for found in inside) and len({found[0] for found in inside}) == 1


def test_large_weights_are_cut_into_column_slices(int8, monkeypatch):
    """A MatMulNBits over more than SLICE_BYTES becomes slices joined by a Concat, over the same bytes
    of the file. The logits stay within rounding: the kernel tiles a slice's columns its own way
    (slices this small have ragged tiles; SmolLM2's head slices give the whole head's logits exactly)."""
    monkeypatch.setattr(split, "SLICE_BYTES", 2048)
    model = split.read_graph(int8 / B.MODEL)
    before = [n.op_type for n in model.graph.node].count("MatMulNBits")
    form = split.cut(model, split.DECODE)
    kinds = ops(form.SerializeToString())
    assert kinds.count("MatMulNBits") > before and "Concat" in kinds
    pieces = [t for t in form.graph.initializer if "/columns" in t.name]
    assert pieces and all(t.data_location == B.EXTERNAL for t in pieces)
    plain, forms = onnxlm.load(int8, split_forms=False), onnxlm.load(int8, split_forms=True)
    assert any("/columns" in name for name in forms.model.session.initializers)
    assert [greedy(forms, p) for p in PROMPTS] == [greedy(plain, p) for p in PROMPTS]
    a, b = plain.model, forms.model
    ids = np.array([[1, *range(40, 60)]])
    caches = [m.new_cache(1, capacity=32) for m in (a, b)]
    sliced, whole = (
        m.step(ids, np.array([21]), np.arange(21)[None], c) for m, c in zip((b, a), caches[::-1], strict=True)
    )
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-5)  # the kernel tiles columns otherwise


def test_a_split_process_never_loads_onnxruntimes_python_binding(int8):
    """Its sessions, buffers and provider list all go through the C library: the binding's ~20 MB
    beside it would be held for nothing."""
    code = (
        "import sys, onnxlm\n"
        f"e = onnxlm.load({str(int8)!r}, split_forms=True)\n"
        "assert type(e.model.session).__name__ == 'SplitSession'\n"
        "e.generate('Our HR team answers questions about leave and pay.', max_new_tokens=4)\n"
        "e.generate_batch(['a', 'Our HR team answers questions about leave and pay.'], max_new_tokens=3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_on_by_default_off_by_environment_and_only_where_there_are_ifs(int8, conditioned, monkeypatch):
    monkeypatch.delenv("ONNXLM_SPLIT", raising=False)
    assert isinstance(onnxlm.load(int8).model.session, split.SplitSession)
    assert not isinstance(onnxlm.load(int8, split_forms=False).model.session, split.SplitSession)
    monkeypatch.setenv("ONNXLM_SPLIT", "0")
    assert not isinstance(onnxlm.load(int8).model.session, split.SplitSession)
    assert isinstance(onnxlm.load(int8, split_forms=True).model.session, split.SplitSession)
    fp32 = conditioned("llama")  # a float32 cache: no Ifs, nothing to split
    assert not isinstance(onnxlm.load(fp32, split_forms=True).model.session, split.SplitSession)


def test_without_the_c_library_the_if_graph_runs_and_says_why(int8, monkeypatch, caplog):
    def missing():
        raise ortc.OrtError("no library here")

    monkeypatch.setattr(ortc, "api", missing)
    with caplog.at_level(logging.WARNING, logger="onnxlm.runtime"):
        engine = onnxlm.load(int8, split_forms=True)
    assert not isinstance(engine.model.session, split.SplitSession)
    assert "no library here" in caplog.text and "Ifs" in caplog.text
    assert len(greedy(engine, PROMPTS[0], 4)) == 4


def test_a_manifest_promising_ifs_the_graph_lacks_runs_the_graph_as_it_is(int8, monkeypatch, caplog):
    monkeypatch.setattr(split, "splits", lambda model: False)
    with caplog.at_level(logging.WARNING, logger="onnxlm.runtime"):
        engine = onnxlm.load(int8, split_forms=True)
    assert not isinstance(engine.model.session, split.SplitSession)
    assert "no int8-cache Ifs to split" in caplog.text


def test_c_api_errors_carry_onnxruntimes_message(int8):
    with pytest.raises(ortc.OrtError, match=r"(?i)protobuf|parse|load"):
        ortc.Session(b"not a graph", 1, {}, ortc.Container())
    values = ortc.Value.of(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert values.shape == (2, 3) and values.dtype == np.int64
    with pytest.raises(ValueError, match="contiguous"):
        ortc.Value.of(np.zeros((4, 4), np.float32)[:, ::2])
    assert S.split_wanted(True) and not S.split_wanted(False)


def test_a_long_float_prefill_hands_the_heap_back(int8, monkeypatch):
    """A prefill of at least driver.TRIM_AFTER tokens in the float32 form ends by giving the C heap's
    free pages back; a short one does not pay for it."""
    from onnxlm.runtime import driver

    trims = []
    monkeypatch.setattr(driver, "release_free_heap", lambda: trims.append(True))
    monkeypatch.setattr(driver, "TRIM_AFTER", 128)  # the tiny model's window is 256 tokens
    engine = onnxlm.load(int8, prefix_cache_mb=0)
    ids = engine.tokenizer.encode(" ".join(PROMPTS[:2]) * 20)
    assert len(ids) >= 128
    engine.generate(ids[:40], max_new_tokens=2, ignore_eos=True)  # float32 form, below the line
    assert trims == []
    engine.generate(ids[:128], max_new_tokens=2, ignore_eos=True)
    assert trims == [True]


def test_only_a_long_prefill_form_call_shrinks_its_arena(int8):
    session = onnxlm.load(int8, split_forms=True).model.session
    assert session.options(session.prefill, np.array([split.SHRINK_FROM, 3])) is session.shrink
    assert session.options(session.prefill, np.array([split.SHRINK_FROM - 1])) is None
    assert session.options(session.decode, np.array([split.SHRINK_FROM])) is None  # (never asked)
