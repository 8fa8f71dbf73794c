"""POST /tokenize and POST /detokenize, in vLLM's shape and llama.cpp's.

/tokenize   {"prompt": "Hi", "add_special_tokens": true, "return_token_strs": false}      (vLLM)
            {"messages": [...], "add_generation_prompt": true, "chat_template_kwargs": {}}
            -> {"count": 2, "max_model_len": 8192, "tokens": [...], "token_strs": null}
            {"content": "Hi", "add_special": false, "with_pieces": false}                 (llama.cpp)
            -> {"tokens": [...]}  or, with pieces, {"tokens": [{"id": 1, "piece": "Hi"}]}
/detokenize {"tokens": [...]} -> {"prompt": "...", "content": "..."}    (vLLM's key, llama.cpp's key)
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine, check_messages
from .openai_fields import IGNORED
from .protocol import _boolean, bad

_TOKENIZE = {
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "chat_template_kwargs",
    "return_token_strs",
    "content",
    "add_special",
    "with_pieces",
}


def _unknown(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known and name not in IGNORED:
            raise bad(f"'{name}' is not supported by this endpoint", name, "unsupported_parameter")


def tokenize(body: dict[str, Any], engine: Engine) -> dict[str, Any]:
    _unknown(body, _TOKENIZE)
    tok = engine.tokenizer
    if "content" in body:  # llama.cpp
        content = body["content"]
        if not isinstance(content, str):
            raise bad("'content' must be a string", "content", "invalid_type")
        ids = tok.encode(content, add_special_tokens=_boolean(body, "add_special", False))
        if _boolean(body, "with_pieces", False):
            return {"tokens": [{"id": i, "piece": tok.decode([i], skip_special_tokens=False)} for i in ids]}
        return {"tokens": ids}
    if body.get("messages") is not None:
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
        try:
            text = tok.apply_chat_template(
                check_messages(body["messages"]), _boolean(body, "add_generation_prompt", True), **extra
            )
        except ValueError as e:
            raise bad(str(e), "messages", "invalid_value") from None
        ids = tok.encode(text, add_special_tokens=_boolean(body, "add_special_tokens", False))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("'prompt' (a string) or 'messages' is required", "prompt", "missing_required_parameter")
        ids = tok.encode(prompt, add_special_tokens=_boolean(body, "add_special_tokens", True))
    strs = None
    if _boolean(body, "return_token_strs", False):
        strs = [tok.tok.id_to_token(i) for i in ids]
    return {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids, "token_strs": strs}


def detokenize(body: dict[str, Any], engine: Engine) -> dict[str, Any]:
    _unknown(body, {"model", "tokens"})
    ids = body.get("tokens")
    vocab = engine.model.facts.vocab_size
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("'tokens' must be a list of token ids", "tokens", "invalid_type")
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise bad(
            f"'tokens': ids outside the vocabulary (size {vocab}): {outside[:5]}", "tokens", "invalid_value"
        )
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    return {"prompt": text, "content": text}


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    tok, facts = engine.tokenizer, engine.model.facts
    pad = facts.pad_token_id
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": None if pad is None else tok.tok.id_to_token(pad),
        "chat_template": engine.manifest.chat_template,
        "model_max_length": engine.context_length,
        "vocab_size": facts.vocab_size,
    }
