"""The OpenAI-compatible server on a tiny model: the real `openai` client against it on loopback
(chat and completions, streamed and not, equal to the engine's own results), concurrency, auth,
metrics, the bounded queue, and the async engine API."""

import asyncio
import concurrent.futures
import json
import time

import numpy as np
import openai
import pytest

from onnxlm.runtime.serving.app import create_app
from tests.serving.loopback import ServerThread, http, sse_lines

KEY = "test-key-123"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def server(engine, serve):
    return serve(create_app(engine, model_name="tiny", api_key=KEY, max_batch=4, max_queue=16))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http("GET", server.base + "/health").json() == {"status": "ok"}
    assert http("GET", server.base + "/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_chat_equals_the_engine_streamed_and_not(engine, client):
    alone = engine.chat(MESSAGES, max_new_tokens=20)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == alone.text
    assert choice.finish_reason == alone.finish_reason
    assert got.usage.prompt_tokens == alone.usage.prompt_tokens
    assert got.usage.completion_tokens == len(alone.token_ids)
    assert got.id.startswith("chatcmpl-") and got.model == "tiny"

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone.text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [alone.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.token_ids)


def test_completions_equal_the_engine_streamed_and_not(engine, client):
    prompt = "The quick brown fox"
    alone = engine.generate(prompt, max_new_tokens=12, ignore_eos=True)
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == alone.text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == alone.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # token ids as the prompt give the same
    ids = engine.tokenizer.encode(prompt)
    again = client.completions.create(
        model="tiny", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == alone.text


def test_logprobs_seed_stop_and_clamped_max_tokens(engine, client):
    alone = engine.chat(MESSAGES, max_new_tokens=8, ignore_eos=True, logprobs=True)
    got = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    entries = got.choices[0].logprobs.content
    assert len(entries) == 8
    assert np.allclose([e.logprob for e in entries], alone.logprobs, atol=1e-4)
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == comp.usage.completion_tokens

    sampled = [
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=42
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] == engine.chat(MESSAGES, max_new_tokens=16, temperature=1.0, seed=42).text

    full = engine.generate("Once", max_new_tokens=30, ignore_eos=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = client.completions.create(
        model="tiny",
        prompt="Once",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]

    window = engine.context_length
    big = client.completions.create(
        model="tiny", prompt="Once", max_tokens=10 * window, temperature=0, extra_body={"ignore_eos": True}
    )
    assert big.choices[0].finish_reason == "length"
    assert big.usage.prompt_tokens + big.usage.completion_tokens == window


def test_concurrent_streams_are_batched_and_each_equals_running_alone(engine, server):
    prompts = [
        "The quick brown fox",
        "Hello world!",
        "我们今天",
        "Once upon a time",
        "Numbers 0 1 2",
        "Marketing",
    ]
    expected = [engine.generate(p, max_new_tokens=24, ignore_eos=True).text for p in prompts]
    steps_before = server.service.scheduler.steps

    async def one(client, prompt):
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        # more than max_batch (4): two wait in the queue and join as rows free up
        return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected
    steps = server.service.scheduler.steps - steps_before
    assert steps < len(prompts) * 23  # sequences shared decode steps
    assert server.service.scheduler.active == 0


def test_auth(server):
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/ready"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            r = http(method, server.base + path, headers=headers, json={} if method == "POST" else None)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert http("GET", server.base + "/health").status_code == 200
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    text = http("GET", server.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'onnxlm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in (
        "onnxlm_prompt_tokens_total",
        "onnxlm_completion_tokens_total",
        "onnxlm_queue_depth",
        "onnxlm_active_sequences",
        "onnxlm_time_to_first_token_seconds_bucket",
        "onnxlm_inter_token_latency_seconds_count",
    ):
        assert name in text
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(series["onnxlm_completion_tokens_total"]) > 0
    assert float(series["onnxlm_time_to_first_token_seconds_count"]) > 0
    assert (
        series['onnxlm_time_to_first_token_seconds_bucket{le="+Inf"}']
        == series["onnxlm_time_to_first_token_seconds_count"]
    )
    assert float(series["process_resident_memory_bytes"]) > 1e6  # prometheus_client's process metrics
    assert float(series["process_cpu_seconds_total"]) > 0


def test_metrics_speak_openmetrics_when_asked(server):
    """Content negotiation: a scraper that asks for OpenMetrics gets it (ending in # EOF)."""
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/openmetrics-text; version=1.0.0"}
    r = http("GET", server.base + "/metrics", headers=headers)
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF") and "onnxlm_queue_depth" in r.text


def test_full_queue_is_refused_at_once_with_retry_after(engine):
    srv = ServerThread(create_app(engine, max_batch=1, max_queue=0))
    try:
        body = {"prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True, "temperature": 0}
        running = sse_lines(srv.base + "/v1/completions", body)
        assert next(running) == 200
        next(running)  # the first event: the one row is busy
        t0 = time.perf_counter()
        r = http("POST", srv.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert time.perf_counter() - t0 < 0.1
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        running.close()
        # the abandoned stream left its row: the next request is served
        deadline = time.time() + 10
        while srv.service.scheduler.active and time.time() < deadline:
            time.sleep(0.01)
        ok = http("POST", srv.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_async_engine_api_batches_concurrent_calls(engine):
    prompts = ["The quick brown fox", "Hello world!", "Once"]
    expected = [engine.generate(p, max_new_tokens=10, ignore_eos=True) for p in prompts]

    async def one(p):
        chunks = [c async for c in engine.astream(p, max_new_tokens=10, ignore_eos=True)]
        return chunks

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        results = asyncio.run(main())
    finally:
        engine.scheduler().close()
        engine._scheduler = None
    for chunks, want in zip(results, expected, strict=True):
        assert [c.token_id for c in chunks] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].finish_reason == "length"


def test_the_app_mounts_inside_another_asgi_app(engine):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    parent = Starlette(routes=[Mount("/llm", app=create_app(engine, model_name="mounted"))])
    parent.state.service = parent.routes[0].app.state.service  # for ServerThread.stop
    srv = ServerThread(parent)
    try:
        client = openai.OpenAI(base_url=srv.base + "/llm/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mounted"]
        got = client.chat.completions.create(model="mounted", messages=MESSAGES, max_tokens=3, temperature=0)
        assert got.usage.completion_tokens <= 3
    finally:
        srv.stop()


def test_disconnects_free_their_rows_and_leak_nothing(engine):
    """Clients that vanish mid-stream: generation stops within a step, the row is freed, and threads, file
    descriptors and memory stay flat over many disconnects."""
    import os
    import threading

    srv = ServerThread(create_app(engine, max_batch=4, max_queue=8))
    body = json.dumps({"prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def vanish():
        import socket

        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(request)
            got = b""
            while got.count(b"data:") < 2:  # read two events, then go
                got += s.recv(4096)

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: vanish(), range(100)))  # warm up
            time.sleep(0.5)
            before = (threading.active_count(), fds(), rss())
            list(pool.map(lambda _: vanish(), range(1000)))
        deadline = time.time() + 10
        while (srv.service.scheduler.active or srv.service.scheduler.queue_depth) and time.time() < deadline:
            time.sleep(0.01)
        assert srv.service.scheduler.active == 0 and srv.service.scheduler._batch.rows.cache is None
        time.sleep(0.5)
        after = (threading.active_count(), fds(), rss())
        assert after[0] <= before[0] and after[1] <= before[1] + 2, (before, after)
        assert after[2] - before[2] < 30 * 2**20, (before, after)
        # stopped early: far fewer decode steps than 1000 full generations would need
        assert srv.service.scheduler.steps < 1100 * 100 / 4
        ok = http("POST", srv.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.stop()
