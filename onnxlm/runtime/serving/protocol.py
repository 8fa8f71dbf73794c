"""The OpenAI wire format: request bodies checked field by field into typed requests, and responses.

Every problem with a request is an APIError carrying the HTTP status and an OpenAI-style body
({"error": {"message", "type", "param", "code"}}); nothing a client sends should reach the model
unchecked or end in a 500.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, check_messages
from ..generate import GenerationParams, SeqOutput, check_prompts

MAX_TOP_LOGPROBS = 5
MAX_STOPS = 4


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN and Infinity (which Python's json would accept) are refused."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# --- field readers --------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return "null" if value is None else "a boolean" if isinstance(value, bool) else type(value).__name__


def _number(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {_kind(value)}", name, "invalid_type")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_kind(value)}", name, "invalid_type")
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_kind(value)}", name, "invalid_type")
    return value


def _unsupported(body: dict, name: str, allowed=(None,)) -> None:
    if body.get(name) not in allowed:
        raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings, got {len(stop)}", "stop", "invalid_value")
    return [s for s in stop if s]  # an empty stop string can never match: ignore it


@dataclass
class GenRequest:
    """One checked request, ready for the scheduler."""

    chat: bool
    model: str
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool
    include_usage: bool
    logprobs: bool  # report the chosen tokens' logprobs (and params.top_logprobs alternatives)


def _common(
    body: dict, engine: Engine, prompt_ids: list[int], chat: bool, default_max: int | None, param: str
):
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_kind(model)}", "model", "invalid_type")
    if _integer(body, "n", 1, 1_000_000, 1) != 1:
        raise bad("only 'n': 1 is supported", "n", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise bad(
                f"'{name}' other than 0 is not supported; use 'repetition_penalty'",
                name,
                "unsupported_parameter",
            )
    if body.get("logit_bias") not in (None, {}):
        raise bad("'logit_bias' is not supported by this server", "logit_bias", "unsupported_parameter")
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise bad("'user' must be a string", "user", "invalid_type")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage", False)
    max_tokens = _integer(body, "max_tokens", 1, 2**31, None)
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", 1, 2**31, None) or max_tokens
    seed = _integer(body, "seed", -(2**63), 2**64 - 1, None)
    try:
        (prompt_ids,) = check_prompts([prompt_ids], engine.model.facts)
    except ValueError as e:
        code = "context_length_exceeded" if "context window" in str(e) else "invalid_value"
        raise bad(str(e).replace("prompt 0", "the prompt"), param, code) from None
    # past the window max_tokens is clamped: the sequence ends there with finish_reason "length"
    room = engine.context_length - len(prompt_ids)
    try:
        params = GenerationParams(
            max_new_tokens=min(max_tokens or default_max or room, room),
            temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0) or 1e-9,  # top_p 0 means: the top token only
            top_k=_integer(body, "top_k", 0, 2**31, 0),
            min_p=_number(body, "min_p", 0.0, 1.0, 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 0.01, 10.0, 1.0),
            seed=None if seed is None else seed % 2**64,
            stop=_stop(body),
            ignore_eos=_boolean(body, "ignore_eos", False),
        )
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    return model, params, stream, include_usage


def parse_completion(body: dict, engine: Engine) -> GenRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("only one prompt per request is supported", "prompt", "unsupported_parameter")
    else:
        raise bad(
            "'prompt' must be a string, a list of token ids, or a list of one of those",
            "prompt",
            "invalid_type",
        )
    _unsupported(body, "echo", (None, False))
    _unsupported(body, "suffix", (None, ""))
    _unsupported(body, "best_of", (None, 1))
    top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    model, params, stream, include_usage = _common(body, engine, ids, False, 16, "prompt")
    params.top_logprobs = top or 0
    return GenRequest(
        False, model or "", [int(t) for t in ids], params, stream, include_usage, top is not None
    )


def parse_chat(body: dict, engine: Engine) -> GenRequest:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    try:
        messages = check_messages(messages)
        if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise ValueError("tool messages and tool calls are not supported by this server")
        ids = engine.tokenizer.encode(engine.render_chat(messages), add_special_tokens=False)
    except ValueError as e:  # ChatTemplateError is a ValueError too
        raise bad(str(e), "messages", "invalid_value") from None
    for name in ("tools", "functions"):
        _unsupported(body, name, (None, []))
    _unsupported(body, "tool_choice", (None, "none", "auto"))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad(
            'only \'response_format\': {"type": "text"} is supported',
            "response_format",
            "unsupported_parameter",
        )
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
    if top is not None and not logprobs and top > 0:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    model, params, stream, include_usage = _common(body, engine, ids, True, None, "messages")
    params.top_logprobs = top or 0
    return GenRequest(True, model or "", ids, params, stream, include_usage, logprobs)


# --- responses ----------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LogprobText:
    """Token strings for logprobs entries (special tokens shown, as OpenAI does)."""

    def __init__(self, engine: Engine):
        self.decode = engine.tokenizer.decode

    def token(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def chat_entry(self, out: SeqOutput) -> dict[str, Any]:
        def one(t: int, lp: float) -> dict[str, Any]:
            s = self.token(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            **one(out.token_id, out.logprob),
            "top_logprobs": [one(t, lp) for t, lp in out.top_logprobs or []],
        }

    def completion_logprobs(self, outs: list[SeqOutput], offset: int = 0) -> dict[str, Any]:
        tokens = [self.token(o.token_id) for o in outs]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [o.logprob for o in outs],
            "top_logprobs": [{self.token(t): lp for t, lp in o.top_logprobs or []} for o in outs],
            "text_offset": offsets,
        }


def completion_body(
    req: GenRequest, rid: str, model: str, outs: list[SeqOutput], text: LogprobText, cached: int = 0
) -> dict:
    created = int(time.time())
    content = "".join(o.text for o in outs)
    reason = outs[-1].finish_reason if outs else "length"
    u = usage(len(req.prompt_ids), len(outs), cached)
    if req.chat:
        logprobs = {"content": [text.chat_entry(o) for o in outs]} if req.logprobs else None
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": logprobs,
            "finish_reason": reason,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": u,
        }
    logprobs = text.completion_logprobs(outs) if req.logprobs else None
    choice = {"index": 0, "text": content, "logprobs": logprobs, "finish_reason": reason}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": u,
    }


def chunk_body(
    req: GenRequest, rid: str, model: str, created: int, choice: dict | None, u: dict | None = None
) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if u is not None:
        body["usage"] = u
    return body


def stream_choice(
    req: GenRequest, text: str, finish_reason: str | None, logprobs: dict | None, role: bool = False
) -> dict:
    if req.chat:
        delta: dict[str, Any] = (
            {"role": "assistant", "content": text}
            if role
            else ({"content": text} if text or logprobs else {})
        )
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
