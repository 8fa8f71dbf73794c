"""Constrained decoding (llguidance): JSON schemas, regular expressions and Lark grammars through the
Python API, on the tiny random model (fast) and SmolLM2 (slow); masks in a batch with free rows."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from onnxlm.runtime import constraints
from onnxlm.runtime.engine import Engine
from onnxlm.runtime.generate import GenerationParams
from tests.constraint_schemas import SCHEMAS


@pytest.fixture(scope="module")
def engine(tiny_llama_bundle):
    return Engine.load(tiny_llama_bundle)


def check_json(completion, schema):
    assert completion.finish_reason == "stop", completion
    jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_tiny(engine, name, temperature):
    schema = SCHEMAS[name]
    for seed in range(3 if temperature else 1):
        out = engine.generate(
            "Hello", json_schema=schema, temperature=temperature, seed=seed, max_new_tokens=300
        )
        check_json(out, schema)


def test_json_schema_as_text_and_in_batch(engine):
    schema = SCHEMAS["enum"]
    outs = engine.generate_batch(
        ["Hello", "world and more"], json_schema=json.dumps(schema), temperature=1, seed=0
    )
    for out in outs:
        check_json(out, schema)


def test_regex_and_grammar_tiny(engine):
    for seed in range(3):
        text = engine.generate("Hi", regex=r"[0-9]{3}-[a-z]{2,4}", temperature=1, seed=seed).text
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    lark = 'start: "[" item ("," item)* "]"\nitem: NUM | "x"\nNUM: /[1-9][0-9]?/'
    for seed in range(3):
        out = engine.generate("Hi", grammar=lark, temperature=1, seed=seed, max_new_tokens=200)
        assert re.fullmatch(r"\[(([1-9][0-9]?|x),)*([1-9][0-9]?|x)\]", out.text), out.text


def test_stream_equals_generate(engine):
    schema = SCHEMAS["optional"]
    whole = engine.generate("Hello", json_schema=schema, temperature=1, seed=5)
    streamed = "".join(c.text for c in engine.stream("Hello", json_schema=schema, temperature=1, seed=5))
    assert streamed == whole.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"json_schema": {"type": "object"}, "regex": "a"}, "at most one"),
        ({"regex": "a("}, "regex"),
        ({"grammar": "start: foo"}, "grammar"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": [1]}, "JSON object"),
    ],
)
def test_bad_constraints_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kwargs)


def test_constrained_and_free_rows_share_a_batch(engine):
    """Rows of one batch: the constrained ones follow their grammars, the free one equals a free run."""
    from onnxlm.runtime.batch import Batch, _run
    from onnxlm.runtime.generate import check_prompts, new_seq
    from onnxlm.runtime.speculate import NgramDrafter

    facts = engine.model.facts
    tok = engine.tokenizer
    prompts = check_prompts([tok.encode("Hello"), tok.encode("world"), tok.encode("Hi there")], facts)
    free = GenerationParams(max_new_tokens=12, ignore_eos=True)
    digits = GenerationParams(regex="[0-9]{4}", temperature=1, seed=1)
    obj = GenerationParams(json_schema=SCHEMAS["enum"], max_new_tokens=200)
    for spec in (None, NgramDrafter()):  # with speculation, a draft position's mask is its own
        seqs = [new_seq(p, q, tok, facts) for p, q in zip(prompts, [digits, free, obj], strict=True)]
        texts = ["", "", ""]
        for step in _run(Batch(engine.model, 512, spec), seqs):
            for out in step.outputs:
                texts[out.seq] += out.text
        assert re.fullmatch("[0-9]{4}", texts[0]), texts[0]
        assert texts[1] == engine.generate("world", max_new_tokens=12, ignore_eos=True).text
        jsonschema.validate(json.loads(texts[2]), SCHEMAS["enum"])


def test_fill_masks_batched_equals_alone(engine):
    tok, vocab = engine.tokenizer, engine.model.facts.vocab_size
    grammar = constraints.compile_grammar(json_schema=SCHEMAS["nested"])

    class Seq:
        finish_reason = None

        def __init__(self, c):
            self.constraint = c

    a, b = constraints.Constraint(grammar, tok, vocab, 0), constraints.Constraint(grammar, tok, vocab, 0)
    assert a.advance(tok.encode('{"', add_special_tokens=False)[0])
    seqs = [Seq(a), Seq(None), Seq(b)]
    constraints.fill_masks(seqs)
    batched = [a.mask.copy(), b.mask.copy()]
    a.fill(), b.fill()
    np.testing.assert_array_equal(batched[0], a.mask)
    np.testing.assert_array_equal(batched[1], b.mask)
    assert not np.array_equal(a.mask, b.mask)  # the rows are in different states
    logits = np.zeros(vocab, np.float32)
    allowed = np.isfinite(b.apply(logits))
    assert 0 < allowed.sum() < vocab


def test_grammar_completion_ends_the_sequence(engine):
    out = engine.generate("Hi", regex="ab", max_new_tokens=50, temperature=1, seed=0)
    assert out.text == "ab" and out.finish_reason == "stop" and len(out.token_ids) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_smollm2(smollm2_bundle, name, temperature):
    engine = _smol(smollm2_bundle)
    schema = SCHEMAS[name]
    messages = [{"role": "user", "content": f"Answer with JSON matching this schema: {json.dumps(schema)}"}]
    for seed in range(2 if temperature else 1):
        out = engine.chat(
            messages, json_schema=schema, temperature=temperature, seed=seed, max_new_tokens=300
        )
        check_json(out, schema)


_SMOL: dict = {}


def _smol(bundle):
    if bundle not in _SMOL:
        _SMOL[bundle] = Engine.load(bundle)
    return _SMOL[bundle]


def test_every_end_token_ends_a_complete_output():
    """A model with two end tokens (</s>, <|im_end|>): once the grammar accepts, either may end it."""
    from tests.bundles import long_bundle
    from tests.fixtures import IM_END

    engine = Engine.load(long_bundle())
    assert len(engine.model.facts.eos_token_ids) == 2 and IM_END == engine.model.facts.eos_token_ids[1]
    out = engine.generate("Hi", regex="[0-9]+", logit_bias={IM_END: 100}, max_new_tokens=20)
    assert re.fullmatch("[0-9]+", out.text) and out.token_ids[-1] == IM_END and out.finish_reason == "stop"
    free = engine.generate("Hi", regex="[0-9]{3}", ignore_eos=True, max_new_tokens=20)
    assert re.fullmatch("[0-9]{3}", free.text) and free.finish_reason == "stop"
