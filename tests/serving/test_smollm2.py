"""The server on the real default model (SmolLM2): the stock `openai` client, chat and completions,
streamed and not, and concurrent streams equal to running each alone."""

import asyncio

import openai
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def engine(smollm2_bundle):
    return load(smollm2_bundle)


@pytest.fixture(scope="module")
def server(engine, serve):
    return serve(create_app(engine, model_name="smollm2", api_key="k", max_batch=4))


def test_openai_client_chat_and_completions(engine, server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="k", max_retries=0, timeout=120)
    alone = engine.chat(QUESTION, max_new_tokens=16)
    got = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == alone.text
    assert "paris" in alone.text.lower()
    streamed = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == alone.text
    prompt = "The three primary colors are"
    text = engine.generate(prompt, max_new_tokens=12).text
    comp = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert comp.choices[0].text == text
    chunks = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == text


def test_concurrent_streams_equal_running_alone(engine, server):
    prompts = ["Write a haiku about the sea.", "List two fruits.", "Say hello in French.", "Name a planet."]
    expected = [engine.chat([{"role": "user", "content": p}], max_new_tokens=24).text for p in prompts]

    async def one(client, p):
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": p}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="k", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected
