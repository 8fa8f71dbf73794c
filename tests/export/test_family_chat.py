"""The new families' chat templates survive export and render through the runtime's sandbox exactly as
transformers renders them, template kwargs included (Qwen3's enable_thinking; Gemma folds a system turn
into the first user turn and refuses roles out of order)."""

from __future__ import annotations

import pytest

from onnxlm.export.convert import export
from onnxlm.runtime import load
from onnxlm.runtime.tokenizer import ChatTemplateError
from tests.fixtures import make_hf_folder

# the parts of the published templates that these features live in
QWEN3 = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
CASES = {"qwen3": QWEN3, "gemma2": GEMMA}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers tokenizer, runtime engine) of one tiny model whose folder carries the template."""
    import transformers

    root = tmp_path_factory.mktemp(request.param)
    folder = make_hf_folder(root / "hf", request.param)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CASES[request.param]
    tok.save_pretrained(folder)
    bundle = export(folder, root / "bundle", progress=False, validate=False)
    return transformers.AutoTokenizer.from_pretrained(folder), load(bundle)


def _hf(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_rendering_equals_transformers(pair, kwargs):
    tok, engine = pair
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "你好"},
    ]
    got = engine.render_chat(messages, **kwargs)
    assert got == _hf(tok, messages, **kwargs)
    if engine.manifest.model.model_type == "qwen3":
        assert got.endswith("<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)
    else:
        assert "<start_of_turn>user\nAnswer briefly.\n\nHello" in got and "system" not in got


@pytest.mark.parametrize("pair", ["gemma2"], indirect=True)
def test_gemma_refuses_roles_out_of_order(pair):
    _, engine = pair
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        engine.render_chat(messages)
