"""Engine end to end on a tiny random Llama bundle, against transformers as the reference: every test
runs on the plain graph (left padding, KV concatenated) and on the fused one (right padding, a shared
KV buffer updated in place), so the public behaviour is the same on both."""

import dataclasses

import numpy as np
import pytest

from onnxlm.bundle import BundleError
from onnxlm.runtime import Completion, Engine
from onnxlm.runtime.generate import Model
from onnxlm.runtime.tokenizer import Tokenizer
from tests.fixtures import BOS, EOS, IM_END, PAD

PROMPTS = ["The quick brown fox", "我们今天去公园散步。 Hello world! This is a much longer prompt"]
STOPS = (EOS, IM_END)


def hf_generate(bundle, prompts_ids, **kw):
    """transformers' generate, left-padded; returns per row the generated ids up to and including eos."""
    import torch

    width = max(map(len, prompts_ids))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
    out = bundle.hf_model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in STOPS), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_matches_transformers(bundle, engine):
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        assert ids[0] == BOS  # BOS from the tokenizer's post-processor
        got = engine.generate(prompt, max_new_tokens=32)
        assert got.token_ids == hf_generate(bundle, [ids], max_new_tokens=32)[0]
        assert got.usage.prompt_tokens == len(ids)
        assert got.usage.completion_tokens == len(got.token_ids)
        assert got.usage.total_tokens == len(ids) + len(got.token_ids)
        assert got.finish_reason == ("stop" if got.token_ids[-1] in STOPS else "length")
        assert got.text == engine.tokenizer.decode(got.token_ids)


def test_logprobs_match_transformers(bundle, engine):
    import torch

    ids = engine.tokenizer.encode(PROMPTS[0])
    got = engine.generate(ids, max_new_tokens=8, ignore_eos=True, logprobs=True)
    out = bundle.hf_model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=8,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref = [
        torch.log_softmax(step[0].double(), -1)[t].item()
        for step, t in zip(out.logits, got.token_ids, strict=True)
    ]
    np.testing.assert_allclose(got.logprobs, ref, atol=1e-4)


def test_logprobs_are_asked_for(engine):
    """Off by default (four passes over the vocabulary a token); top_logprobs implies them."""
    plain = engine.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
    asked = engine.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True, logprobs=True)
    assert plain.token_ids == asked.token_ids and plain.logprobs == [] and len(asked.logprobs) == 4
    assert all(c.logprob is None for c in engine.stream(PROMPTS[0], max_new_tokens=3))
    top = list(engine.stream(PROMPTS[0], max_new_tokens=3, top_logprobs=2))
    assert all(c.logprob is not None and c.logprob == c.top_logprobs[0][1] for c in top)
    with pytest.raises(ValueError, match="logprobs must be True or False"):
        engine.generate(PROMPTS[0], max_new_tokens=2, logprobs="yes")


def test_batch_equals_alone_and_transformers_left_padded(bundle, engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])
    batch = engine.generate_batch(PROMPTS, max_new_tokens=32, logprobs=True)
    alone = [engine.generate(p, max_new_tokens=32, logprobs=True) for p in PROMPTS]
    ref = hf_generate(bundle, ids, max_new_tokens=32)
    for b, a, r in zip(batch, alone, ref, strict=True):
        assert b.token_ids == a.token_ids == r
        assert b.text == a.text and b.finish_reason == a.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)


def test_batch_with_early_finisher_equals_alone(engine):
    """One sequence stops early (stop token) and leaves the batch; the other runs on unchanged."""
    full = engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    stop_id = full.token_ids[2]
    params = dict(max_new_tokens=16, stop_token_ids=[stop_id], temperature=0.9, seed=11)
    batch = engine.generate_batch(PROMPTS + [PROMPTS[0]], **params)
    alone = [engine.generate(p, **params) for p in PROMPTS]
    assert batch[0].token_ids == batch[2].token_ids == alone[0].token_ids
    assert batch[1].token_ids == alone[1].token_ids
    assert batch[1].text == alone[1].text


def test_numpy_path_equals_io_binding(bundle, engine):
    plain = Engine.load(bundle.path, io_binding=False, threads=2)
    for prompt in PROMPTS:
        a = engine.generate(prompt, max_new_tokens=16, logprobs=True)
        b = plain.generate(prompt, max_new_tokens=16, logprobs=True)
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_repetition_penalty_matches_transformers(bundle, engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    got = engine.generate(ids, max_new_tokens=24, repetition_penalty=1.5)
    assert got.token_ids == hf_generate(bundle, [ids], max_new_tokens=24, repetition_penalty=1.5)[0]
    assert got.token_ids != engine.generate(ids, max_new_tokens=24).token_ids


def test_stream_chunks_add_up_to_generate(engine):
    for prompt in PROMPTS:
        chunks = list(engine.stream(prompt, max_new_tokens=20))
        whole = engine.generate(prompt, max_new_tokens=20)
        assert "".join(c.text for c in chunks) == whole.text
        assert [c.token_id for c in chunks] == whole.token_ids
        assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == whole.finish_reason and last.usage == whole.usage
        assert last.timings.prefill_s > 0 and last.timings.ttft_s >= last.timings.prefill_s


def test_timings_are_wall_time_of_the_whole_round(engine, monkeypatch):
    """decode tok/s counts sampling and the loop around the model, not forward passes alone (peers are
    timed by the wall clock around their loops; a model-only figure flattered onnxlm)."""
    import time

    from onnxlm.runtime import batch

    real = batch.sample_next

    def slow(*a, **kw):
        time.sleep(0.01)
        return real(*a, **kw)

    monkeypatch.setattr(batch, "sample_next", slow)
    t = engine.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).timings
    assert t.ttft_s >= t.prefill_s + 0.01  # the first sample is inside the time to first token
    assert t.decode_s >= 5 * 0.01 and t.tokens_per_s <= 5 / (5 * 0.01)  # so is every later one
    assert t.sample_s >= 6 * 0.01


def test_max_new_tokens_and_ignore_eos(bundle, engine):
    got = engine.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True)
    assert len(got.token_ids) == 5 and got.finish_reason == "length"
    full = engine.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    eos = full.token_ids[3]
    j = full.token_ids.index(eos)
    # a manifest whose eos is a token the model produces: generation stops there, unless ignore_eos
    m = dataclasses.replace(
        engine.manifest, model=dataclasses.replace(engine.manifest.model, eos_token_ids=[eos])
    )
    e2 = Engine(Model(engine.model.session, m), Tokenizer(bundle.tokenizer, m), m)
    stopped = e2.generate(PROMPTS[0], max_new_tokens=12)
    assert stopped.token_ids == full.token_ids[: j + 1] and stopped.finish_reason == "stop"
    ran_on = e2.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    assert ran_on.token_ids == full.token_ids and ran_on.finish_reason == "length"


def test_stop_token_ids(engine):
    full = engine.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    tok = full.token_ids[4]
    j = full.token_ids.index(tok)
    got = engine.generate(PROMPTS[1], max_new_tokens=12, stop_token_ids=[tok], ignore_eos=True)
    assert got.token_ids == full.token_ids[: j + 1] and got.finish_reason == "stop"


def test_stop_strings_cut_text(engine):
    full = engine.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True)
    text = full.text.replace("\ufffd", "")
    assert len(text) >= 6, full.text
    stop = text[4:6]
    expected = full.text[: full.text.index(stop)]
    got = engine.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True, stop=[stop, "never-appears"])
    assert got.text == expected and got.finish_reason == "stop"
    assert got.token_ids == full.token_ids[: len(got.token_ids)]
    streamed = list(engine.stream(PROMPTS[0], max_new_tokens=32, ignore_eos=True, stop=stop))
    assert "".join(c.text for c in streamed) == expected and streamed[-1].finish_reason == "stop"


def test_context_window(bundle, engine):
    ctx = bundle.context_length
    with pytest.raises(ValueError, match=rf"{ctx + 2} tokens.*context window is {ctx}"):
        engine.generate([5] * (ctx + 2))
    with pytest.raises(ValueError, match=str(ctx)):
        engine.generate([5] * ctx)
    got = engine.generate([5] * (ctx - 8), max_new_tokens=32, ignore_eos=True)
    assert len(got.token_ids) == 8 and got.finish_reason == "length"
    assert got.usage.total_tokens == ctx
    short, longer = engine.generate_batch(
        [[5] * (ctx - 8), [5] * (ctx - 3)], max_new_tokens=32, ignore_eos=True
    )
    assert len(short.token_ids) == 8 and len(longer.token_ids) == 3
    assert short.token_ids == got.token_ids


def test_bad_prompts_and_params(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([1, 10**6])
    with pytest.raises(TypeError):
        engine.generate(3.5)
    with pytest.raises(TypeError, match="unknown generation parameter"):
        engine.generate("hi", max_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        engine.stream("hi", temperature=-1)  # raised on the call, before iteration
    with pytest.raises(TypeError):
        engine.generate_batch("not a list")


def test_seeded_sampling_is_reproducible_and_batch_equals_alone(engine):
    params = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate(PROMPTS[0], **params)
    b = engine.generate(PROMPTS[0], **params)
    assert a.token_ids == b.token_ids
    assert engine.generate(PROMPTS[0], **{**params, "seed": 99}).token_ids != a.token_ids
    batch = engine.generate_batch(PROMPTS, **params)
    assert batch[0].token_ids == a.token_ids
    assert batch[1].token_ids == engine.generate(PROMPTS[1], **params).token_ids


def test_chat(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    text = engine.render_chat(messages)
    assert text.startswith("<s><|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(BOS) == 1  # BOS once, written by the template
    got = engine.chat(messages, max_new_tokens=10)
    assert isinstance(got, Completion)
    assert got.token_ids == engine.generate(ids, max_new_tokens=10).token_ids
    assert got.usage.prompt_tokens == len(ids)
    assert "".join(c.text for c in engine.stream_chat(messages, max_new_tokens=10)) == got.text
    parts = [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]
    assert engine.render_chat(parts) == engine.render_chat([{"role": "user", "content": "你好"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "bot", "content": "x"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text parts"),
        (["user: hi"], "dict"),
    ],
)
def test_chat_rejects_bad_messages(engine, messages, match):
    with pytest.raises(ValueError, match=match):
        engine.chat(messages)


def test_load_refuses_a_broken_bundle(bundle, tmp_path):
    with pytest.raises(BundleError):
        Engine.load(tmp_path)


def test_chunked_prefill_equals_whole_prompt(engine):
    from onnxlm.runtime.batch import generate_steps
    from onnxlm.runtime.generate import GenerationParams

    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True, logprobs=True)

    def run(chunk):
        steps = list(generate_steps(engine.model, engine.tokenizer, ids, params, prefill_chunk=chunk))
        return [[o.token_id for o in s.outputs] for s in steps], [o.logprob for s in steps for o in s.outputs]

    whole, lp_whole = run(None)
    chunked, lp_chunked = run(3)
    assert whole == chunked and len(whole) == 12
    np.testing.assert_allclose(lp_whole, lp_chunked, atol=1e-4)
    layer1 = [
        [o.token_id for o in s.outputs] for s in engine.steps(PROMPTS, max_new_tokens=12, ignore_eos=True)
    ]
    assert layer1 == whole


def test_a_prefills_logits_are_the_same_however_it_is_chunked(engine):
    """Bit for bit, on both layouts: no prefill call brings a row a single token (onnxruntime computes
    a one-token call by other kernels, whose sums round differently; driver.chunk_end)."""
    from onnxlm.runtime.driver import make_rows

    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]

    def last(chunk, batch):
        job = make_rows(engine.model, chunk).start(batch)
        try:
            return job.run().copy()
        finally:
            job.free()

    for ids in prompts:
        whole = last(None, [ids])
        for chunk in (1, 2, len(ids) - 1):
            np.testing.assert_array_equal(last(chunk, [ids]), whole)
    np.testing.assert_array_equal(last(len(prompts[0]) - 1, prompts), last(None, prompts))


def test_a_long_call_shrinking_the_arena_changes_no_logit(engine, monkeypatch):
    """A call bringing session.SHRINK_FROM tokens or more runs with onnxruntime's arena shrinkage (the
    plain and fused graphs' sessions here); what it computes is the same."""
    from onnxlm.runtime import generate
    from onnxlm.runtime.driver import make_rows

    ids = engine.tokenizer.encode(PROMPTS[1])

    def last():
        job = make_rows(engine.model, None).start([ids])
        try:
            return job.run().copy()
        finally:
            job.free()

    from onnxlm.runtime import session

    kept = last()
    used = []
    shrinking = session._shrinking
    monkeypatch.setattr(session, "_shrinking", lambda: used.append(True) or shrinking())
    monkeypatch.setattr(generate, "SHRINK_FROM", 2)
    np.testing.assert_array_equal(last(), kept)
    assert bool(used) == engine.model.io.shared  # the shared-buffer graph's calls (the concat one: none)
    greedy = engine.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    monkeypatch.undo()
    assert engine.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids == greedy


def test_stream_validates_on_the_call(engine, bundle):
    with pytest.raises(ValueError, match="context window"):
        engine.stream([5] * (bundle.context_length + 1))  # no iteration needed
    with pytest.raises(ValueError, match="context window"):
        engine.stream_chat([{"role": "user", "content": "hi " * 200}])
