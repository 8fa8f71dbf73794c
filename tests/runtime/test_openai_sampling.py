"""OpenAI's sampling fields as logits processors (no model) and token bytes (the tiny tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlm.runtime.generate import GenerationParams
from onnxlm.runtime.sampling import make_logits_processors


def run(processors, tokens, logits):
    for p in processors:
        logits = p(tokens, logits)
    return logits


def test_presence_and_frequency_count_generated_tokens_only():
    logits = np.zeros((1, 6), np.float32)
    # prompt [1, 1], generated [2, 2, 2, 3]: token 1 is not penalised, 2 three times, 3 once
    procs = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25, prompt_len=2)
    out = run(procs, [[1, 1, 2, 2, 2, 3]], logits)
    np.testing.assert_allclose(out[0], [0, 0, -1.25, -0.75, 0, 0])


def test_logit_bias_adds_and_keys_may_be_strings():
    procs = make_logits_processors(logit_bias={"4": 100, 0: -100})
    out = run(procs, [[]], np.zeros((1, 5), np.float32))
    assert out[0].tolist() == [-100, 0, 0, 0, 100]


def test_min_tokens_holds_back_stop_ids():
    procs = make_logits_processors(min_tokens=2, stop_ids=[0, 3], prompt_len=1)
    held = run(procs, [[7, 5]], np.zeros((1, 4), np.float32))  # one generated: still held back
    assert np.isneginf(held[0, [0, 3]]).all() and np.isfinite(held[0, [1, 2]]).all()
    free = run(procs, [[7, 5, 6]], np.zeros((1, 4), np.float32))
    assert np.isfinite(free).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "token id"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kwargs)


def test_engine_honours_bias_min_tokens_and_penalties(tiny_llama_bundle):
    from onnxlm.runtime.engine import Engine

    engine = Engine.load(tiny_llama_bundle)
    banned = engine.generate("Hello", max_new_tokens=8, ignore_eos=True).token_ids[0]
    out = engine.generate("Hello", max_new_tokens=8, ignore_eos=True, logit_bias={banned: -100})
    assert banned not in out.token_ids
    forced = engine.generate("Hello", max_new_tokens=4, ignore_eos=True, logit_bias={7: 100})
    assert forced.token_ids == [7] * 4
    eos = engine.model.facts.eos_token_ids[0]
    early = engine.generate("Hello", max_new_tokens=6, logit_bias={eos: 100})
    assert early.token_ids == [eos]
    late = engine.generate("Hello", max_new_tokens=6, logit_bias={eos: 100}, min_tokens=3)
    assert eos not in late.token_ids[:3] and late.token_ids[3] == eos
    plain = engine.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids
    varied = engine.generate("Hello", max_new_tokens=20, ignore_eos=True, frequency_penalty=2).token_ids
    assert len(set(varied)) > len(set(plain))


def test_token_bytes_rejoin_split_characters(tiny_llama_bundle):
    from onnxlm.runtime.engine import Engine

    tok = Engine.load(tiny_llama_bundle).tokenizer
    text = "你好, 世界 😀 hello"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces).decode() == text
    assert any(b"\xef\xbf\xbd" != p and "\ufffd" in tok.decode([i]) for i, p in zip(ids, pieces, strict=True))


def test_one_token_bytes_without_the_whole_table(tiny_llama_bundle):
    """A stream ending on a cut character asks for a few tokens' bytes: that must not build the table
    of the whole vocabulary (~0.2 s for 49k tokens, paid on the last token of a first generation)."""
    from onnxlm.runtime.engine import Engine

    tok = Engine.load(tiny_llama_bundle).tokenizer
    ids = tok.encode("你好, 世界 😀 hello", add_special_tokens=False)
    one = [tok.token_bytes(i) for i in ids] + [tok.token_bytes(-1), tok.token_bytes(tok.vocab_size)]
    assert tok._bytes is None  # answered token by token
    table = tok.token_bytes_table()
    assert one == [table[i] for i in ids] + [b"", b""]
