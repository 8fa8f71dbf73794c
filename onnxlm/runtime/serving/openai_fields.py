"""Which request fields the server honours, which it accepts and ignores, and how the constrained-output
fields of OpenAI, vLLM and llama.cpp map onto one engine (llguidance).

Every field of a request body is one of:
- honoured (CHAT_FIELDS / COMPLETION_FIELDS): read, checked and acted on;
- IGNORED: harmless OpenAI bookkeeping that changes nothing in the output, accepted and dropped:
  `user`, `metadata`, `store`, `service_tier`, `safety_identifier`, `prompt_cache_key`;
- anything else: a 400 that names it (code `unsupported_parameter`), never a silent 200.

Constrained output, whatever the client speaks (at most one per request):
    response_format {"type": "json_object"}                  any JSON object
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    guided_json / guided_regex / guided_grammar / guided_choice          (vLLM, older)
    structured_outputs {"json" | "regex" | "grammar" | "choice" | "json_object"}   (vLLM)
    json_schema / grammar                                                  (llama.cpp; GBNF or Lark)
"""

from __future__ import annotations

import json
from typing import Any

IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})

_CONSTRAINTS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    "guided_choice",
    "structured_outputs",
    "json_schema",
    "grammar",
)
_SAMPLING = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "ignore_eos",
    *_CONSTRAINTS,
)
CHAT_FIELDS = frozenset(
    {
        *_SAMPLING,
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
    }
)
COMPLETION_FIELDS = frozenset({*_SAMPLING, "prompt", "echo", "suffix", "best_of"})

_HINTS = {
    "functions": "use 'tools'",
    "function_call": "use 'tool_choice'",
    "guided_decoding_backend": "this server's one backend is llguidance",
}


class FieldError(ValueError):
    """A field that cannot be honoured; `param` names it."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def check_fields(body: dict[str, Any], chat: bool) -> None:
    """Refuse the first field this endpoint neither honours nor lists as harmless."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in known and name not in IGNORED:
            hint = f"; {_HINTS[name]}" if name in _HINTS else ""
            where = "/v1/chat/completions" if chat else "/v1/completions"
            raise FieldError(f"'{name}' is not supported by {where}{hint}", name, "unsupported_parameter")


def constraint(body: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(the field that asked, {json_schema | regex | grammar: ...}) for the request's constrained
    output; (None, {}) when there is none. Two of them: a FieldError naming the second."""
    found: list[tuple[str, dict[str, Any]]] = []
    for name in _CONSTRAINTS:
        value = body.get(name)
        if value is None:
            continue
        kwargs = _READERS[name](value, name)
        if kwargs:
            found.append((name, kwargs))
    if len(found) > 1:
        raise FieldError(
            f"'{found[1][0]}' and '{found[0][0]}' both constrain the output; send one", found[1][0]
        )
    return found[0] if found else (None, {})


def _response_format(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise FieldError(f"'{name}' must be an object with a 'type'", name, "invalid_type")
    kind = value["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise FieldError(f"'{name}.json_schema' must be an object with a 'schema'", name, "invalid_type")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise FieldError(
                f"'{name}.json_schema.schema' must be a JSON schema object", name, "invalid_type"
            )
        return {"json_schema": schema}
    raise FieldError(
        f"'{name}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}", name, "invalid_value"
    )


def _json(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FieldError(f"'{name}' is not valid JSON", name) from None
    if not isinstance(value, (dict, bool)):
        raise FieldError(f"'{name}' must be a JSON schema object", name, "invalid_type")
    return {"json_schema": value}


def _regex(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise FieldError(f"'{name}' must be a string", name, "invalid_type")
    return {"regex": value}


def _grammar(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise FieldError(f"'{name}' must be a string (a Lark or GBNF grammar)", name, "invalid_type")
    from ..constraints import to_lark

    try:
        return {"grammar": to_lark(value)}
    except ValueError as e:
        raise FieldError(f"'{name}': {e}", name) from None


def _choice(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise FieldError(f"'{name}' must be a non-empty list of strings", name, "invalid_type")
    return {"grammar": "start: " + " | ".join(json.dumps(c) for c in value)}


def _structured(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(f"'{name}' must be an object", name, "invalid_type")
    readers = {"json": _json, "regex": _regex, "grammar": _grammar, "choice": _choice}
    given = [k for k, v in value.items() if v is not None]
    unknown = [k for k in given if k not in readers and k != "json_object"]
    if unknown:
        raise FieldError(
            f"'{name}.{unknown[0]}' is not supported by this server", name, "unsupported_parameter"
        )
    if len(given) > 1:
        raise FieldError(f"'{name}' takes one of json, regex, grammar, choice, json_object", name)
    if not given:
        return {}
    key = given[0]
    if key == "json_object":
        return {"json_schema": {"type": "object"}} if value[key] else {}
    return readers[key](value[key], name)


_READERS = {
    "response_format": _response_format,
    "guided_json": _json,
    "guided_regex": _regex,
    "guided_grammar": _grammar,
    "guided_choice": _choice,
    "structured_outputs": _structured,
    "json_schema": _json,
    "grammar": _grammar,
}
