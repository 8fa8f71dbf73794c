"""langchain-openai against `create_app` on loopback: with_structured_output and bind_tools."""

from __future__ import annotations

import json

import jsonschema
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from tests.bundles import long_bundle
from tests.constraint_schemas import TOOL_SCHEMAS, TOOLS

langchain_openai = pytest.importorskip("langchain_openai")
pydantic = pytest.importorskip("pydantic")


class Person(pydantic.BaseModel):
    # no other keys: a random model would otherwise fill an extra property until max_tokens
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    colour: str = pydantic.Field(json_schema_extra={"enum": ["red", "green"]})


@pytest.fixture(scope="module")
def server(serve):
    return serve(create_app(load(long_bundle(), threads=1), model_name="tiny", max_batch=4))


def chat_model(server, **kw):
    return langchain_openai.ChatOpenAI(
        model="tiny", base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def smol_server(smollm2_bundle, serve):
    return serve(create_app(load(smollm2_bundle), model_name="tiny", max_batch=4))


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(server, method):
    llm = chat_model(server, temperature=0, max_tokens=300)
    got = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(got, Person) and 0 <= got.age <= 120 and got.colour in ("red", "green")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output_smollm2(smol_server, method):
    llm = chat_model(smol_server, temperature=0, max_tokens=200)
    if method == "json_mode":  # any JSON object: a random model need not ever close it, a real one does
        got = llm.with_structured_output(None, method="json_mode").invoke("Describe a cat as a JSON object.")
        assert isinstance(got, dict)
        return
    got = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(got, Person) and 0 <= got.age <= 120


def test_bind_tools_round_trip(server):
    bind_tools_round_trip(server)


@pytest.mark.slow
def test_bind_tools_round_trip_smollm2(smol_server):
    bind_tools_round_trip(smol_server)


def bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat_model(server, temperature=0, max_tokens=300)
    ask = [HumanMessage("What is the weather in Paris?")]
    reply = llm.bind_tools(TOOLS, tool_choice="required", parallel_tool_calls=False).invoke(ask)
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    jsonschema.validate(call["args"], TOOL_SCHEMAS[call["name"]])
    history = [*ask, reply, ToolMessage(json.dumps({"temp": 21}), tool_call_id=call["id"])]
    final = llm.bind_tools(TOOLS, tool_choice="none").invoke(history)
    assert isinstance(final.content, str) and not final.tool_calls
    streamed = None
    for part in llm.bind_tools(TOOLS, tool_choice="get_weather").stream(ask):
        streamed = part if streamed is None else streamed + part
    assert streamed.tool_calls and streamed.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(streamed.tool_calls[0]["args"], TOOL_SCHEMAS["get_weather"])
