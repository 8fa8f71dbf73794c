"""Tool calling: the default prompt format, constrained calls, parsing and streamed deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from onnxlm.runtime import tools as T
from onnxlm.runtime.engine import Engine
from tests.constraint_schemas import TOOL_SCHEMAS as SCHEMAS
from tests.constraint_schemas import TOOLS, WEATHER

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine():
    from tests.bundles import long_bundle

    return Engine.load(long_bundle())


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and (names is None or c.name in names)
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_calls_follow_the_schemas(engine, temperature):
    # parallel calls: the random model rarely stops calling, so the last may be cut by max_new_tokens
    out = engine.chat(
        ASK, tools=TOOLS, tool_choice="required", temperature=temperature, seed=1, max_new_tokens=300
    )
    check_calls(out.tool_calls)
    named = {"type": "function", "function": {"name": "add"}}
    out = engine.chat(
        ASK, tools=TOOLS, tool_choice=named, temperature=temperature, seed=2, max_new_tokens=300
    )
    check_calls(out.tool_calls, {"add"})
    single = engine.chat(
        ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=temperature,
        max_new_tokens=300,
    )
    assert len(single.tool_calls) == 1 and single.finish_reason == "tool_calls"


def test_auto_is_text_or_valid_calls(engine):
    for seed in range(4):
        out = engine.chat(ASK, tools=TOOLS, temperature=1, seed=seed, max_new_tokens=60)
        if out.tool_calls:
            check_calls(out.tool_calls)
        else:
            assert T.OPEN not in out.text


def test_none_renders_no_tools_and_parses_nothing(engine):
    plain = engine.render_chat(ASK)
    ids, params, parse = engine.chat_request(ASK, tools=TOOLS, tool_choice="none")
    assert engine.tokenizer.decode(ids, skip_special_tokens=False) == plain and not parse
    assert params.grammar is None


def test_default_format_renders_definitions_history_and_results(engine):
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    ids, _, _ = engine.chat_request(history, tools=TOOLS)
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.count("Be brief.") == 1 and T.SYSTEM_HEADER in text and '"name": "add"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
        in text
    )
    assert "<tool_response>\n21 degrees\n</tool_response>" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tools": [{"type": "function"}]}, "tools\\[0\\]"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
        ({"tools": [WEATHER, WEATHER]}, "two tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "json_schema": {"type": "object"}}, "json_schema"),
    ],
)
def test_bad_tool_requests_raise(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.chat(ASK, max_new_tokens=2, **kwargs)


def test_parse_tool_calls():
    text = 'ok\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>{"name": "x", "parameters": {}}</tool_call>'
    content, calls = T.parse_tool_calls(text)
    assert content == "ok" and [c.name for c in calls] == ["add", "x"]
    assert json.loads(calls[0].arguments) == {"a": 1, "b": 2} and calls[1].arguments == "{}"
    assert T.parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_a_call_cut_off_by_max_tokens_reads_as_the_stream_reads_it():
    whole = T.call_text("add", '{"a": 1}')
    for cut_in, name, args in [
        ('\n<tool_call>\n{"name": "x", "arguments": {"b": [1, ', "x", '{"b": [1, '),  # name complete
        ('\n<tool_call>\n{"name": "x", "argu', None, None),  # name not yet complete
    ]:
        text = whole + cut_in  # the grammar lets an answer be text or calls, not both
        content, calls = T.parse_tool_calls(text)
        assert content is None and calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 1}
        assert [(c.name, c.arguments) for c in calls[1:]] == ([(name, args)] if name else [])
        s = T.ToolCallStream()
        events = s.push(text) + s.finish()
        streamed = [e["function"]["name"] for kind, e in events if kind == "call"]
        assert streamed == [c.name for c in calls] and all(kind != "content" for kind, _ in events)
        args_streamed = [""] * len(streamed)
        for kind, e in events:
            if kind == "args":
                args_streamed[e["index"]] += e["function"]["arguments"]
        assert args_streamed == [c.arguments for c in calls]
    # with no complete call, a call cut before its name stays text; after it, it is a call
    assert T.parse_tool_calls('<tool_call>\n{"na') == ('<tool_call>\n{"na', [])
    content, calls = T.parse_tool_calls('<tool_call>\n{"name": "x", "arguments": {"b"')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("x", '{"b"')]


def test_stream_deltas_rebuild_the_calls():
    text = (
        T.call_text("add", '{"a": 1, "b": {"c": "}"}}') + "\n" + T.call_text("get_weather", '{"city": "P"}')
    )
    for size in (1, 2, 5, 100):
        s = T.ToolCallStream()
        events = []
        for i in range(0, len(text), size):
            events += s.push(text[i : i + size])
        events += s.finish()
        assert all(kind != "content" for kind, _ in events)
        heads = [e for kind, e in events if kind == "call"]
        assert [h["function"]["name"] for h in heads] == ["add", "get_weather"]
        assert [h["index"] for h in heads] == [0, 1] and all(h["id"].startswith("call_") for h in heads)
        args = ["", ""]
        for kind, e in events:
            if kind == "args":
                args[e["index"]] += e["function"]["arguments"]
        assert args == ['{"a": 1, "b": {"c": "}"}}', '{"city": "P"}']


def test_stream_plain_text_passes_through():
    s = T.ToolCallStream()
    events = s.push("  <to") + s.push("day is fine")
    assert "".join(e for _, e in events) == "  <today is fine"


@pytest.mark.slow
def test_smollm2_tool_round_trip(smollm2_bundle):
    engine = Engine.load(smollm2_bundle)
    out = engine.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_new_tokens=100)
    check_calls(out.tool_calls)
    call = out.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    final = engine.chat(history, tools=TOOLS, tool_choice="none", max_new_tokens=40)
    assert final.text and not final.tool_calls


def test_a_template_with_tools_renders_them_itself(engine):
    import dataclasses

    from onnxlm.runtime.tokenizer import Tokenizer

    template = (
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}:{{ c.function.arguments.city }}{% endfor %}"
        "{% endfor %}"
    )
    manifest = dataclasses.replace(engine.manifest, chat_template=template)
    native = Engine(engine.model, Tokenizer(engine.tokenizer.tok, manifest), manifest)
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    ids, params, parse = native.chat_request(history, tools=TOOLS, tool_choice="required")
    text = native.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("[tool get_weather][tool add]") and "get_weather:Oslo" in text
    assert T.SYSTEM_HEADER not in text and parse and params.grammar is not None
