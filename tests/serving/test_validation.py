"""Hostile and malformed requests: each gets a 4xx with an OpenAI-style error body, never a 500, and
the next request is served normally. A property-based test throws generated bodies at both endpoints."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxlm.runtime.serving.app import create_app
from tests.serving.loopback import http

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(engine, serve):
    return serve(create_app(engine, max_batch=4, max_queue=64))


JSON = {"Content-Type": "application/json"}


def post(server, path, body=None, raw: bytes | None = None, headers=None):
    return http("POST", server.base + path, json=body, body=raw, headers=headers)


def assert_error(r, status=400, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_served(server):
    r = post(server, CHAT, {"messages": OK_MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


BAD_RAW = [
    b"{not json",
    b"",
    b"[1, 2, 3]",
    b'"a string"',
    b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}',
    b"\xff\xfe\x00garbage",
    b"[" * 100_000,
]


@pytest.mark.parametrize("raw", BAD_RAW, ids=range(len(BAD_RAW)))
@pytest.mark.parametrize("path", [CHAT, COMP])
def test_malformed_json_is_400(server, path, raw):
    assert_error(
        post(server, path, raw=raw, headers={"Content-Type": "application/json"}), code="invalid_json"
    )


M = OK_MESSAGES
BAD_CHAT = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [None]}, "messages"),
    ({"messages": M, "temperature": "hot"}, "temperature"),
    ({"messages": M, "temperature": -1}, "temperature"),
    ({"messages": M, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": M, "min_p": 1.5}, "min_p"),
    ({"messages": M, "top_p": 1.5}, "top_p"),
    ({"messages": M, "top_p": True}, "top_p"),
    ({"messages": M, "max_tokens": 0}, "max_tokens"),
    ({"messages": M, "max_tokens": -5}, "max_tokens"),
    ({"messages": M, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": M, "max_tokens": "10"}, "max_tokens"),
    ({"messages": M, "n": 17}, "n"),
    ({"messages": M, "n": 0}, "n"),
    ({"messages": M, "stop": 5}, "stop"),
    ({"messages": M, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": M, "seed": "x"}, "seed"),
    ({"messages": M, "seed": 2**70}, "seed"),
    ({"messages": M, "stream": "yes"}, "stream"),
    ({"messages": M, "logprobs": 1}, "logprobs"),
    ({"messages": M, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": M, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": M, "presence_penalty": 2.5}, "presence_penalty"),
    ({"messages": M, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": M, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": M, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"messages": M, "tools": [{"type": "function"}], "tool_choice": "auto"}, "tools"),
    ({"messages": M, "tool_choice": "required"}, "tool_choice"),
    ({"messages": M, "response_format": {"type": "xml"}}, "response_format"),
    (
        {"messages": M, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
        "response_format",
    ),
    ({"messages": M, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": M, "frobnicate": 1}, "frobnicate"),
    ({"messages": M, "guided_regex": "a("}, "guided_regex"),
    ({"messages": M, "guided_json": {"type": "object"}, "grammar": 'root ::= "a"'}, "grammar"),
    ({"messages": M, "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"messages": M, "min_tokens": -1}, "min_tokens"),
    ({"messages": M, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"messages": M, "echo": True}, "echo"),
    ({"messages": M, "model": 7}, "model"),
    ({"messages": M, "stream_options": 3}, "stream_options"),
    ({"messages": M, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p + str(i) for i, (_, p) in enumerate(BAD_CHAT)])
def test_bad_chat_fields_are_400_naming_the_field(server, body, param):
    assert_error(post(server, CHAT, body), param=param)


BAD_COMP = [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "Hi", "echo": 1}, "echo"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "suffix": "x"}, "suffix"),
    ({"prompt": "Hi", "tools": []}, "tools"),
    ({"prompt": "Hi", "structured_outputs": {"xml": "a"}}, "structured_outputs"),
    ({"prompt": "Hi", "best_of": 3}, "best_of"),
    ({"prompt": "Hi", "min_p": 2}, "min_p"),
    ({"prompt": "Hi", "top_k": -1}, "top_k"),
]


@pytest.mark.parametrize("body,param", BAD_COMP, ids=[p + str(i) for i, (_, p) in enumerate(BAD_COMP)])
def test_bad_completion_fields_are_400_naming_the_field(server, body, param):
    assert_error(post(server, COMP, body), param=param)


def test_context_window_and_other_statuses(server, engine):
    window = engine.context_length
    err = assert_error(post(server, COMP, {"prompt": [5] * window}), code="context_length_exceeded")
    assert str(window) in err["message"]
    long_chat = [{"role": "user", "content": "word " * window}]
    assert_error(
        post(server, CHAT, {"messages": long_chat}), code="context_length_exceeded", param="messages"
    )
    assert_error(http("GET", server.base + "/v1/nothing"), 404)
    assert_error(http("GET", server.base + CHAT), 405)
    assert_error(post(server, CHAT, raw=b"{" + b" " * (5 * 2**20) + b"}", headers=JSON), 413)
    assert_served(server)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "messages",
    "prompt",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "user",
]
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "bot"]) | json_values,
        "content": st.text(max_size=30) | json_values,
    }
)


def small_max_tokens(body: dict) -> dict:
    """Keep generation short: a valid max_tokens above 8 becomes 8 (any other value stays, to be refused)."""
    n = body.get("max_tokens")
    if "max_tokens" not in body or (isinstance(n, int) and not isinstance(n, bool) and n > 8):
        body["max_tokens"] = 8
    return body


bodies = st.builds(
    lambda extra, fields: small_max_tokens({**extra, **fields}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(message, max_size=3) | json_values,
            "prompt": st.text(max_size=30) | json_values,
        }
    ),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
)

# near-valid bodies: good messages, parameters around and past their edges (so many reach the model)
near_valid = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=40)}
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional={
        "temperature": st.floats(-0.5, 2.5) | st.just(0),
        "top_p": st.floats(-0.5, 1.5),
        "max_tokens": st.integers(-2, 8),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
        "seed": st.integers(-(2**64), 2**65),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 7),
        "n": st.integers(0, 2),
        "top_k": st.integers(-1, 500),
        "repetition_penalty": st.floats(-1, 11),
    },
).map(small_max_tokens)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies | near_valid, path=st.sampled_from([CHAT, COMP]))
def test_generated_bodies_never_get_a_500(server, body, path):
    r = post(server, path, raw=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text, body)  # 404: an unknown model
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_served_after_the_storm(server):
    assert_served(server)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1), ("top_p", 1.5), ("presence_penalty", 2.5), ("min_tokens", -1), ("top_k", -3)],
)
def test_one_validator_for_generation_parameters(server, field, value):
    """The server checks a generation parameter's range with GenerationParams itself: same message,
    and the 400 names the parameter."""
    from onnxlm.runtime.generate import GenerationParams
    from onnxlm.runtime.sampling import ParamError

    err = assert_error(post(server, CHAT, {"messages": M, field: value}), code="invalid_value", param=field)
    with pytest.raises(ParamError) as raised:
        GenerationParams(**{field: value})
    assert raised.value.param == field and err["message"] == str(raised.value)
