"""Tokenizer wrapper, sandboxed chat template, streaming detokenizer (no model needed)."""

import codecs
import datetime

import numpy as np
import pytest

from onnxlm.bundle import Manifest, ModelFacts
from onnxlm.runtime.tokenizer import ChatTemplateError, Detokenizer, Tokenizer
from tests.fixtures import BOS, CHAT_TEMPLATE, EOS, IM_END, VOCAB, build_tokenizer

CHINESE = "我们今天去公园散步。你好，世界！机器学习模型可以生成文本。"


@pytest.fixture(scope="module")
def hf_tok():
    return build_tokenizer()


def manifest(template=CHAT_TEMPLATE, add_bos=True):
    facts = ModelFacts(
        model_type="llama",
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        hidden_size=8,
        vocab_size=VOCAB,
        context_length=64,
        bos_token_id=BOS,
        eos_token_ids=[EOS, IM_END],
        add_bos_token=add_bos,
    )
    return Manifest(model=facts, chat_template=template)


def make(hf_tok, **kw):
    return Tokenizer(hf_tok, manifest(**kw))


def test_encode_adds_bos_once(hf_tok):
    tok = make(hf_tok)
    ids = tok.encode("Hello world")
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"
    assert make(hf_tok, add_bos=False).encode("Hello world") == ids[1:]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_chinese_splits_across_tokens(hf_tok):
    """The premise of the detokenizer test: some token is only part of a character."""
    ids = hf_tok.encode(CHINESE).ids
    assert any("\ufffd" in hf_tok.decode([i]) for i in ids)


def test_detokenizer_streams_whole_characters(hf_tok):
    tok = make(hf_tok)
    ids = tok.encode(CHINESE + " and English too. 你好", add_special_tokens=False)
    detok = Detokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were held back


def test_detokenizer_equals_full_decode_on_random_ids(hf_tok):
    tok = make(hf_tok)
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 25))).tolist()
        detok = Detokenizer(tok)
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        full = tok.decode(ids)
        data = b"".join(tok.token_bytes(i) for i in ids if i not in tok.special_token_ids())
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(data, final=False)
        if decoder.getstate()[0]:  # a character cut off at the end is dropped, not shown as U+FFFD
            assert full.endswith("\ufffd")
            full = full[:-1]
        assert text == full, ids


def test_detokenizer_drops_only_a_cut_off_character(hf_tok):
    tok = make(hf_tok)
    ids = tok.encode("你好😀", add_special_tokens=False)
    texts = set()
    for k in range(1, len(ids) + 1):
        detok = Detokenizer(tok)
        text = "".join(detok.add(i) for i in ids[:k]) + detok.flush()
        assert "\ufffd" not in text and "你好😀".startswith(text)
        texts.add(text)
    assert len(texts) >= 2  # some prefixes end inside a character
    real = tok.encode("a\ufffdb", add_special_tokens=False)  # a replacement character that is text
    detok = Detokenizer(tok)
    assert "".join(detok.add(i) for i in real) + detok.flush() == "a\ufffdb"


def test_detokenizer_steps_decode_stream_and_falls_back_to_its_window(hf_tok, monkeypatch):
    """Deltas come from tokenizers' DecodeStream; one that fails mid-stream (InvalidPrefix) is replaced
    by the same window decoded by hand, and the text is unchanged."""
    import onnxlm.runtime.tokenizer as T

    tok = make(hf_tok)
    ids = tok.encode(CHINESE + " and 你好😀 again", add_special_tokens=False)
    steps = []

    real = T.DecodeStream

    class Counting:
        def __init__(self, **options):
            self.stream = real(**options)

        def step(self, tokenizer, token):
            steps.append(token)
            if len(steps) == 7:
                raise Exception("InvalidPrefix")
            return self.stream.step(tokenizer, token)

    def run(with_stream):
        monkeypatch.setattr(T, "DecodeStream", with_stream)
        detok = Detokenizer(tok)
        return "".join(detok.add(i) for i in ids) + detok.flush(), detok

    text, detok = run(Counting)
    assert len(steps) == 7 and detok._stream is None  # stepped until it failed, then by hand
    assert text == tok.decode(ids) and "\ufffd" not in text
    steps.clear()
    monkeypatch.undo()
    plain = Detokenizer(tok)
    assert "".join(plain.add(i) for i in ids) + plain.flush() == text and plain._stream is not None


def test_detokenizer_skips_special_tokens(hf_tok):
    tok = make(hf_tok)
    detok = Detokenizer(tok)
    out = (
        "".join(detok.add(i) for i in [BOS, *tok.encode("hi", add_special_tokens=False), EOS]) + detok.flush()
    )
    assert out == "hi"


def test_chat_template_renders(hf_tok):
    tok = make(hf_tok)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert (
        text
        == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == BOS and IM_END in ids
    assert not tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=False
    ).endswith("assistant\n")


def test_no_chat_template_is_an_error(hf_tok):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        make(hf_tok, template=None).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append(1) }}",
        "{% for m in messages %}{{ m.update({'x': 1}) }}{% endfor %}",
    ],
)
def test_sandbox_refuses_unsafe_templates(hf_tok, template):
    with pytest.raises(ChatTemplateError):
        make(hf_tok, template=template).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers_and_whitespace_settings(hf_tok):
    msgs = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="only user turns"):
        make(hf_tok, template="{{ raise_exception('only user turns') }}").apply_chat_template(msgs)
    year = make(hf_tok, template="{{ strftime_now('%Y') }}").apply_chat_template(msgs)
    assert year == str(datetime.datetime.now().year)
    # trim_blocks + lstrip_blocks, loopcontrols, {% generation %}, tojson without ascii escapes
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% break %}{% endif %}\n"
        "{{ m | tojson }}\n"
        "{% endfor %}"
    )
    out = make(hf_tok, template=template).apply_chat_template(msgs)
    assert out == '{"role": "user", "content": "é"}\n[b]'


def test_template_syntax_error(hf_tok):
    with pytest.raises(ChatTemplateError, match="syntax"):
        make(hf_tok, template="{% for %}").apply_chat_template([{"role": "user", "content": "x"}])


def test_detokenizer_keeps_spaces_of_sentencepiece_style_tokens():
    """A Metaspace decoder drops the leading space of the first token it sees: decoding tokens one by
    one gives "Helloworld"; the anchor window keeps the space."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁你": 4, "好": 5}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    ids = [1, 2, 3, 4, 5, 2]
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)  # the naive way loses spaces
    detok = Detokenizer(tok)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids) == "Hello world! 你好 world"


def test_token_bytes_of_a_unigram_model_with_byte_fallback():
    """A Unigram model says byte_fallback only in its own JSON (no Python attribute), and this one has
    no ByteFallback decoder either: its <0x..> pieces are still single bytes."""
    from tokenizers import Tokenizer as HF
    from tokenizers.models import Unigram

    pieces = [("<unk>", 0.0), ("<0x41>", -1.0), ("<0xE4>", -1.0), ("\u2581hi", -2.0)]
    tok = Tokenizer(HF(Unigram(pieces, unk_id=0, byte_fallback=True)), manifest())
    got = [tok.token_bytes(i) for i in range(4)]
    assert got == [b"<unk>", b"A", b"\xe4", b" hi"] and got == tok.token_bytes_table()
