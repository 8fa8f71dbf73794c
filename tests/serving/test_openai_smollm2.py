"""The openai client against the server on SmolLM2 (slow): every test schema at temperature 0 and 1,
a tool round trip and streamed tool calls."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from tests.constraint_schemas import SCHEMAS, TOOL_SCHEMAS, TOOLS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(smollm2_bundle, serve):
    srv = serve(create_app(load(smollm2_bundle), model_name="smollm2", max_batch=8))
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_schema(client, temperature):
    for name, schema in SCHEMAS.items():
        ask = [{"role": "user", "content": f"Reply with JSON for: {name}"}]
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        got = client.chat.completions.create(
            model="smollm2",
            messages=ask,
            response_format=fmt,
            temperature=temperature,
            seed=1,
            max_tokens=300,
            n=2,
        )
        for choice in got.choices:
            assert choice.finish_reason == "stop", (name, choice)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_tools(client):
    ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    first = client.chat.completions.create(
        model="smollm2",
        messages=ask,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])
    history = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"},
    ]
    final = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, max_tokens=40)
    assert final.choices[0].message.content or final.choices[0].message.tool_calls
    args, names = "", []
    for chunk in client.chat.completions.create(
        model="smollm2",
        messages=ask,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        stream=True,
    ):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            names += [d.function.name] if d.function.name else []
            args += d.function.arguments or ""
    assert len(names) == 1
    jsonschema.validate(json.loads(args), TOOL_SCHEMAS[names[0]])
