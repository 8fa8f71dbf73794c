"""What clients send, through the stock openai client against `create_app` on loopback: structured
output in every dialect, tools (streamed and not), n > 1, several prompts, penalties and logit_bias,
logprobs bytes, echo with prompt logprobs, /tokenize and /detokenize, the field policy."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import openai
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from tests.bundles import long_bundle
from tests.constraint_schemas import SCHEMAS, TOOL_SCHEMAS, TOOLS
from tests.serving.loopback import ServerThread, http

ASK = [{"role": "user", "content": "Give me the data."}]


@pytest.fixture(scope="module")
def engine():
    return load(long_bundle(), threads=1)


@pytest.fixture(scope="module")
def server(engine, serve):
    return serve(create_app(engine, model_name="tiny", max_batch=8, max_queue=32))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)


def post(server, path, body):
    return http("POST", server.base + path, json=body, timeout=120)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_response_format_json_schema(client, name, temperature):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    got = client.chat.completions.create(
        model="tiny", messages=ASK, response_format=fmt, temperature=temperature, seed=3, max_tokens=300
    )
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)


def test_json_object_and_the_peer_dialects(client):
    got = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=300,
        seed=1,
        temperature=1,
    )
    assert isinstance(json.loads(got.choices[0].message.content), dict)
    schema = SCHEMAS["enum"]
    for extra in (
        {"guided_json": schema},
        {"structured_outputs": {"json": schema}},
        {"json_schema": schema},
    ):
        got = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=300, extra_body=extra)
        jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    comp = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=300, extra_body={"guided_json": schema}
    )
    jsonschema.validate(json.loads(comp.choices[0].text), schema)
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        got = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, extra_body=extra)
        assert got.choices[0].message.content in ("yes", "no")
    for extra in ({"guided_regex": "[0-9]{3}"}, {"grammar": "root ::= [0-9] [0-9] [0-9]"}):
        got = client.completions.create(
            model="tiny", prompt="Hi", max_tokens=20, temperature=1, extra_body=extra
        )
        assert re.fullmatch("[0-9]{3}", got.choices[0].text), got.choices[0].text


def test_field_policy(server, client):
    r = post(server, "/v1/chat/completions", {"messages": ASK, "frobnicate": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    assert "frobnicate" in r.json()["error"]["message"]
    ok = post(
        server,
        "/v1/chat/completions",
        {
            "messages": ASK,
            "max_tokens": 2,
            "user": "u1",
            "metadata": {"a": "b"},
            "store": False,
            "service_tier": "auto",
        },
    )
    assert ok.status_code == 200
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    r = post(
        server, "/v1/completions", {"prompt": "Hi", "guided_json": {"type": "object"}, "guided_regex": "a"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"


def test_tool_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=10
    )
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in (
        "stop",
        "length",
    )
    named = {"type": "function", "function": {"name": "add"}}
    got = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice=named, max_tokens=300
    )
    assert {c.function.name for c in got.choices[0].message.tool_calls} == {"add"}


def test_streamed_tool_calls(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        stream=True,
        seed=4,
        temperature=1,
    )
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": None, "args": ""})
                if d.id:
                    assert c["id"] is None
                    c["id"], c["name"] = d.id, d.function.name
                c["args"] += d.function.arguments or ""
            assert not choice.delta.content
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    jsonschema.validate(json.loads(calls[0]["args"]), TOOL_SCHEMAS[calls[0]["name"]])


def test_n_choices_and_several_prompts(client):
    got = client.chat.completions.create(
        model="tiny", messages=ASK, n=3, max_tokens=8, temperature=1, seed=7, logprobs=True
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert len({c.message.content for c in got.choices}) > 1  # seed + i per choice: they differ
    assert got.usage.completion_tokens == sum(len(c.logprobs.content) for c in got.choices)
    one = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    assert got.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    again = client.chat.completions.create(
        model="tiny", messages=ASK, n=3, max_tokens=8, temperature=1, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in got.choices]
    comp = client.completions.create(
        model="tiny", prompt=["Hello", "Once upon"], n=2, max_tokens=5, temperature=0
    )
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[0].text == comp.choices[1].text != comp.choices[2].text == comp.choices[3].text
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model="tiny", prompt=["Hello", "Once upon"], max_tokens=5, temperature=0, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: comp.choices[0].text, 1: comp.choices[2].text}


def test_penalties_bias_stop_ids_min_tokens(engine, client):
    plain = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = engine.tokenizer.encode(plain.choices[0].text, add_special_tokens=False)
    forced = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logit_bias={"50": 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == engine.tokenizer.decode([50] * 4)
    penalised = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=16,
        temperature=0,
        frequency_penalty=2,
        presence_penalty=1,
        extra_body={"ignore_eos": True},
    )
    assert penalised.choices[0].text != plain.choices[0].text
    stop = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]},
    )
    assert stop.choices[0].finish_reason == "stop" and stop.usage.completion_tokens <= 3
    eos = engine.model.facts.eos_token_ids[0]
    held = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=8,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 5},
    )
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"


def test_logprobs_bytes_rejoin(engine, client):
    # the regex makes the model spell characters the tiny tokenizer splits across tokens
    got = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=24,
        logprobs=True,
        top_logprobs=20,
        extra_body={"guided_regex": "😀你好"},
    )
    content = got.choices[0].logprobs.content
    assert got.choices[0].message.content == "😀你好"
    pieces = [bytes(t.bytes) for t in content]
    assert b"".join(pieces) == "😀你好".encode() and len(pieces) > 3
    assert any("\ufffd" in t.token for t in content)  # a piece's text is lossy, its bytes are not
    assert all(len(t.top_logprobs) == 20 for t in content)
    cut = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=1, extra_body={"guided_regex": "😀"}
    )
    assert cut.choices[0].finish_reason == "length" and "\ufffd" not in cut.choices[0].message.content


def test_echo_prompt_logprobs_equal_the_engine(engine, client):
    text = "Once upon a time there was"
    got = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == text and got.usage.completion_tokens == 0
    ids = engine.tokenizer.encode(text)
    lp = choice.logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(ids)
    logits = engine.model.logits(ids).astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(lp[1:], want, atol=1e-4)
    assert all(len(t) == 1 for t in choice.logprobs.top_logprobs[1:])
    more = client.completions.create(
        model="tiny", prompt=text, max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    assert more.choices[0].text.startswith(text) and len(more.choices[0].logprobs.tokens) == len(ids) + 3


def test_tokenize_detokenize(engine, server):
    r = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["tokens"] == engine.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == engine.context_length
    chat = post(server, "/tokenize", {"messages": ASK}).json()
    assert engine.tokenizer.decode(chat["tokens"], skip_special_tokens=False) == engine.render_chat(ASK)
    llama = post(server, "/tokenize", {"content": "Hello", "with_pieces": True}).json()
    assert "".join(p["piece"] for p in llama["tokens"]) == "Hello"
    back = post(server, "/detokenize", {"tokens": r["tokens"]}).json()
    assert back["prompt"].endswith("Hello world") and back["content"] == back["prompt"]
    bad = post(server, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_chat_template_kwargs_reach_the_template(engine):
    import dataclasses

    from onnxlm.runtime.engine import Engine
    from onnxlm.runtime.tokenizer import Tokenizer

    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking %}<think>{% endif %}"
    )
    manifest = dataclasses.replace(engine.manifest, chat_template=template)
    thinking = Engine(engine.model, Tokenizer(engine.tokenizer.tok, manifest), manifest)
    srv = ServerThread(create_app(thinking, model_name="tiny"))
    try:
        on = post(
            srv, "/tokenize", {"messages": ASK, "chat_template_kwargs": {"enable_thinking": True}}
        ).json()
        off = post(srv, "/tokenize", {"messages": ASK}).json()
        assert thinking.tokenizer.decode(on["tokens"], skip_special_tokens=False).endswith("<think>")
        assert on["count"] > off["count"]
        body = {"messages": ASK, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": True}}
        assert post(srv, "/v1/chat/completions", body).json()["usage"]["prompt_tokens"] == on["count"]
    finally:
        srv.stop()


def test_streamed_echo_and_chat_choices(engine, client):
    text = "Once upon a time"
    whole = client.completions.create(
        model="tiny", prompt=text, max_tokens=4, echo=True, logprobs=2, temperature=0
    )
    parts, tokens, offsets = "", [], []
    for chunk in client.completions.create(
        model="tiny", prompt=text, max_tokens=4, echo=True, logprobs=2, temperature=0, stream=True
    ):
        for c in chunk.choices:
            parts += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert parts == whole.choices[0].text and parts.startswith(text)
    assert tokens == whole.choices[0].logprobs.tokens and offsets == whole.choices[0].logprobs.text_offset
    roles, texts, reasons = {}, {}, {}
    for chunk in client.chat.completions.create(
        model="tiny", messages=ASK, n=2, max_tokens=5, stream=True, seed=1
    ):
        for c in chunk.choices:
            roles[c.index] = roles.get(c.index) or c.delta.role
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert roles == {0: "assistant", 1: "assistant"} and set(reasons.values()) <= {"stop", "length"}
    whole = client.chat.completions.create(model="tiny", messages=ASK, n=2, max_tokens=5, seed=1)
    assert texts == {c.index: c.message.content for c in whole.choices}
