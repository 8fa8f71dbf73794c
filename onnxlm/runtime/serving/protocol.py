"""The OpenAI wire format: request bodies checked field by field into typed requests, and responses.

Every problem with a request is an APIError carrying the HTTP status and an OpenAI-style body
({"error": {"message", "type", "param", "code"}}); nothing a client sends should reach the model
unchecked or end in a 500.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..constraints import compile_grammar
from ..engine import Engine
from ..generate import GenerationParams, check_prompts
from ..sampling import ParamError, check_logit_bias
from ..tools import check_tool_choice, check_tools
from .openai_fields import FieldError, check_fields, constraint

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request


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


def _number(body: dict, name: str, default: float | None) -> float | None:
    """A JSON number; its range is GenerationParams' to check (the one validator)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {_kind(value)}", name, "invalid_type")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None):
    """A JSON integer; `lo`/`hi` only for the wire's own fields (n, max_tokens, seed, logprobs): a
    generation parameter's range is GenerationParams' to check."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_kind(value)}", name, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_kind(value)}", name, "invalid_type")
    return value


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
    """One checked request, ready for the scheduler: `n` choices for each prompt."""

    chat: bool
    model: str
    prompts: list[list[int]]  # token ids; chat has one, /v1/completions may have several
    params: GenerationParams
    stream: bool
    include_usage: bool
    logprobs: bool  # report the chosen tokens' logprobs (and params.top_logprobs alternatives)
    n: int = 1
    echo: bool = False  # completions: the prompt (and with logprobs, its tokens' logprobs) first
    prompt_texts: list[str] = field(default_factory=list)  # what echo writes back
    generate: bool = True  # False for max_tokens 0 with echo: score the prompt only
    tools: bool = False  # the answer may hold tool calls to parse

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def choices(self) -> list[tuple[int, list[int], GenerationParams]]:
        """(choice index, prompt ids, parameters) of every choice; with a seed each sample of a prompt
        draws from its own seed (seed + sample), so n choices differ and each can be replayed."""
        out = []
        for i, ids in enumerate(self.prompts):
            for j in range(self.n):
                p = self.params
                if j and p.seed is not None:
                    p = dataclasses.replace(p, seed=(p.seed + j) % 2**64)
                out.append((i * self.n + j, ids, p))
        return out


def _check(body: dict, chat: bool) -> tuple[str | None, dict[str, Any]]:
    try:
        check_fields(body, chat)
        source, kwargs = constraint(body)
        if kwargs:
            compile_grammar(**kwargs)  # refuse a bad schema / regex / grammar naming its field
    except FieldError as e:
        raise bad(str(e), e.param, e.code) from None
    except ValueError as e:
        raise bad(f"'{source}': {e}", source, "invalid_value") from None
    return source, kwargs


def _token_ids(body: dict, name: str, vocab: int) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{name}' must be a list of token ids", name, "invalid_type")
    bad_ids = [t for t in value if not 0 <= t < vocab]
    if bad_ids:
        raise bad(f"'{name}': token ids outside the vocabulary (size {vocab}): {bad_ids[:5]}", name)
    return value


def _common(
    body: dict, engine: Engine, chat: bool
) -> tuple[str, dict[str, Any], bool, bool, int, int | None]:
    """(model, generation keywords other than max_new_tokens, stream, include_usage, n, max_tokens)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_kind(model)}", "model", "invalid_type")
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    unknown = sorted(set(options or {}) - {"include_usage", "include_obfuscation"})
    if unknown:  # include_obfuscation is harmless: these streams carry no padding to obfuscate
        raise bad(
            f"'stream_options.{unknown[0]}' is not supported", "stream_options", "unsupported_parameter"
        )
    include_usage = _boolean(options or {}, "include_usage", False)
    max_tokens = _integer(body, "max_tokens", None, 0, 2**31)
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", None, 1, 2**31) or max_tokens
        if max_tokens == 0:
            raise bad("'max_tokens' must be at least 1", "max_tokens", "invalid_value")
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    vocab = engine.model.facts.vocab_size
    try:
        bias = check_logit_bias(body.get("logit_bias"), vocab)
    except ValueError as e:
        raise bad(str(e), "logit_bias", "invalid_value") from None
    kwargs = dict(
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0) or 1e-9,  # OpenAI's top_p 0 means: the top token only
        top_k=_integer(body, "top_k", 0),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        logit_bias=bias or None,
        min_tokens=_integer(body, "min_tokens", 0),
        stop_token_ids=_token_ids(body, "stop_token_ids", vocab),
        seed=None if seed is None else seed % 2**64,
        stop=_stop(body),
        ignore_eos=_boolean(body, "ignore_eos", False),
    )
    return model or "", kwargs, stream, include_usage, n, max_tokens


def _fit(engine: Engine, prompts: list[list[int]], param: str) -> list[list[int]]:
    try:
        return check_prompts(prompts, engine.model.facts)
    except ValueError as e:
        code = "context_length_exceeded" if "context window" in str(e) else "invalid_value"
        message = str(e) if len(prompts) > 1 else str(e).replace("prompt 0", "the prompt")
        raise bad(message, param, code) from None


def _params(kwargs: dict[str, Any], room: int, max_tokens: int | None, default_max: int | None):
    # past the window max_tokens is clamped: the sequence ends there with finish_reason "length"
    try:
        return GenerationParams(max_new_tokens=max(1, min(max_tokens or default_max or room, room)), **kwargs)
    except ParamError as e:
        raise bad(str(e), e.param, "invalid_value") from None
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None


def _prompts(body: dict, engine: Engine) -> tuple[list[list[int]], list[str]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    single = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    items = [prompt] if single else prompt
    if not isinstance(items, list) or not items or len(items) > MAX_PROMPTS:
        raise bad(
            f"'prompt' must be a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} of those",
            "prompt",
            "invalid_type",
        )
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(engine.tokenizer.encode(item))
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids.append(list(item))
            texts.append("")
        else:
            raise bad(
                "'prompt' must be a string, a list of token ids, or a list of those", "prompt", "invalid_type"
            )
    return ids, texts


def parse_completion(body: dict, engine: Engine) -> GenRequest:
    _, constrained = _check(body, chat=False)
    ids, texts = _prompts(body, engine)
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    echo = _boolean(body, "echo", False)
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    model, kwargs, stream, include_usage, n, max_tokens = _common(body, engine, False)
    if body.get("best_of") not in (None, 1, n):
        raise bad(
            "'best_of' other than 'n' is not supported by this server", "best_of", "unsupported_parameter"
        )
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' 0 needs 'echo': true (scoring the prompt)", "max_tokens", "invalid_value")
    prompts = _fit(engine, ids, "prompt")
    room = engine.context_length - max(len(p) for p in prompts)
    params = _params(
        {**kwargs, **constrained, "logprobs": top is not None, "top_logprobs": top or 0}, room, max_tokens, 16
    )
    if echo:  # what echo writes back: the prompt as given, or its tokens' text
        texts = [
            t or engine.tokenizer.decode(p, skip_special_tokens=False)
            for t, p in zip(texts, prompts, strict=True)
        ]
    return GenRequest(
        False, model, prompts, params, stream, include_usage, top is not None, n, echo, texts, max_tokens != 0
    )


def _template_vars(body: dict) -> dict[str, Any]:
    extra = body.get("chat_template_kwargs")
    if extra is None:
        return {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    reserved = sorted(set(extra) & {"messages", "tools", "add_generation_prompt"})
    if reserved:
        raise bad(
            f"'chat_template_kwargs' cannot set {reserved[0]!r}", "chat_template_kwargs", "invalid_value"
        )
    return extra


def parse_chat(body: dict, engine: Engine) -> GenRequest:
    _, constrained = _check(body, chat=True)
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs and top > 0:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    model, kwargs, stream, include_usage, n, max_tokens = _common(body, engine, True)
    template_vars = _template_vars(body)
    tool_fields = {
        k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls") if body.get(k) is not None
    }
    try:
        tools = check_tools(tool_fields.get("tools"))
        check_tool_choice(tool_fields.get("tool_choice"), tools)
    except ValueError as e:
        param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
        raise bad(str(e), param, "invalid_value") from None
    try:
        ids, params, parse = engine.chat_request(
            messages,
            template_vars,
            **tool_fields,
            **kwargs,
            **constrained,
            logprobs=logprobs,
            top_logprobs=top or 0,
        )
    except ParamError as e:
        raise bad(str(e), e.param, "invalid_value") from None
    except ValueError as e:  # ChatTemplateError is a ValueError too
        text = str(e)
        param = next((p for p in ("parallel_tool_calls", "tools") if p in text), "messages")
        raise bad(text, param, "invalid_value") from None
    (ids,) = _fit(engine, [ids], "messages")
    room = engine.context_length - len(ids)
    params = dataclasses.replace(params, max_new_tokens=max(1, min(max_tokens or room, room)))
    return GenRequest(True, model, [ids], params, stream, include_usage, logprobs, n, tools=parse)
