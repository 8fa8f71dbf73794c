"""The server doing less work: speculation (--draft ngram) with output equal to the engine's, prefix
reuse across chat turns reported in usage and /metrics, long prompts prefilled between the running
streams' rounds, and abandoned long requests that hold no KV they did not use."""

import asyncio
import threading
import time

import httpx
import openai
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.generate import GenerationParams
from onnxlm.runtime.prefix import PrefixCache
from onnxlm.runtime.scheduler import Scheduler
from onnxlm.runtime.serving.app import create_app
from tests.bundles import tiny_bundle
from tests.serving.loopback import http

HISTORY = [
    {"role": "system", "content": "You answer questions about the weather."},
    {"role": "user", "content": "Is it warm today?"},
]


@pytest.fixture(scope="module")
def engine():
    return load(tiny_bundle("fused").path, threads=1, draft="ngram")


@pytest.fixture(scope="module")
def server(engine, serve):
    return serve(create_app(engine, model_name="tiny", max_batch=4, max_queue=8))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=60)


def test_speculating_server_equals_the_plain_engine(engine, client):
    plain = load(engine.bundle_dir, threads=1, prefix_cache_mb=0)
    prompt = "one two three four five six seven one two three four five six seven one two three"
    want = plain.generate(prompt, max_new_tokens=24, ignore_eos=True)
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == want.text
    chunks = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text


def test_second_turn_reuses_the_first_and_says_so(server, client):
    first = client.chat.completions.create(model="tiny", messages=HISTORY, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = HISTORY + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    metrics = http("GET", server.base + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("onnxlm_prefix_cache_hits_total ")]
    assert hits and float(hits[0].split()[1]) >= 1
    assert "onnxlm_draft_tokens_total" in metrics
    cached = [line for line in metrics.splitlines() if line.startswith("onnxlm_prefix_cache_bytes ")]
    assert cached and float(cached[0].split()[1]) > 0


def test_the_same_request_again_reuses_its_whole_prompt(client):
    """A retry reuses every prompt position and the logits after them: cached_tokens is the whole
    prompt and the answer is the first one's (streamed or not)."""
    ask = [{"role": "user", "content": "Describe the refund policy in two sentences."}]
    runs = [
        client.chat.completions.create(
            model="tiny", messages=ask, max_tokens=12, temperature=0, logprobs=True
        )
        for _ in range(2)
    ]
    assert runs[1].usage.prompt_tokens_details.cached_tokens == runs[1].usage.prompt_tokens
    assert runs[1].choices[0].message.content == runs[0].choices[0].message.content
    first = [r.choices[0].logprobs.content[0].logprob for r in runs]
    assert first[1] == first[0]  # sampled from the very logits the first request sampled from
    chunks = client.chat.completions.create(
        model="tiny", messages=ask, max_tokens=12, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == runs[0].choices[0].message.content
    )


def test_long_prompt_is_prefilled_between_running_rounds(engine):
    """With a small prefill chunk, a long prompt arriving while a stream runs takes several chunks,
    and the running stream gets tokens in between (it is not frozen until the prefill ends). The long
    prompt is submitted from the running stream's own third token, so the order does not depend on
    the machine's speed."""
    sched = Scheduler(engine.model, engine.tokenizer, max_batch=4, max_queue=4, prefill_chunk=16)
    events: list[str] = []
    done = threading.Event()

    def late(out):
        events.append("late")
        if isinstance(out, BaseException) or out.finish_reason:
            done.set()

    def running(out):
        events.append("run")
        if events.count("run") == 3:
            sched.submit(list(range(10, 110)), GenerationParams(max_new_tokens=2, ignore_eos=True), late)

    try:
        sched.submit([5, 6, 7], GenerationParams(max_new_tokens=100, ignore_eos=True), running)
        assert done.wait(60)
        first_late = events.index("late")
        during = events[:first_late].count("run") - 3
        assert during >= 5  # 100 tokens in chunks of 16: a round ran between each two chunks
    finally:
        sched.close()


def test_a_next_turn_and_a_new_prompt_admitted_together(engine):
    """A prompt mostly reused from the prefix cache (a chat's next turn) and a new one with more tokens
    to run, admitted together and prefilled in small chunks: both answer (the reused row, done after
    its first chunk, still needs room for the later padded chunks), each as it would alone."""
    sched = Scheduler(
        engine.model, engine.tokenizer, max_batch=4, max_queue=8, prefill_chunk=8, prefix_cache=PrefixCache()
    )
    history, fresh = list(range(40, 100)), list(range(200, 230))
    params = GenerationParams(max_new_tokens=4, ignore_eos=True)
    outs: dict[str, list] = {"turn": [], "new": []}
    done = {k: threading.Event() for k in outs}

    def collect(key):
        def on(out):
            outs[key].append(out)
            if isinstance(out, BaseException) or out.finish_reason:
                done[key].set()

        return on

    sent = []

    def running(out):
        if not sent:  # both queued from the running stream's callback: one admission
            sent.append(True)
            sched.submit(history + [1, 2], params, collect("turn"))
            sched.submit(fresh, params, collect("new"))

    try:
        first = threading.Event()
        sched.submit(history, GenerationParams(max_new_tokens=1), lambda o: first.set())
        assert first.wait(30)
        sched.submit([5, 6, 7], GenerationParams(max_new_tokens=30, ignore_eos=True), running)
        assert done["turn"].wait(60) and done["new"].wait(60)
        for key in outs:
            assert not any(isinstance(o, BaseException) for o in outs[key]), outs[key]
        alone = load(engine.bundle_dir, threads=1, prefix_cache_mb=0)
        for key, prompt in (("turn", history + [1, 2]), ("new", fresh)):
            want = alone.generate(prompt, max_new_tokens=4, ignore_eos=True).token_ids
            assert [o.token_id for o in outs[key]] == want
    finally:
        sched.close()


def test_a_mixed_burst_answers_every_request_as_alone(engine, serve):
    """Two dozen requests at once, of the kinds a chat service gets (next turns over a shared system
    prompt, new chats, plain completions, streams, n=2): none fails, and each greedy answer is the
    one the same request gets alone afterwards, whoever it was admitted and prefilled with."""
    srv = serve(create_app(engine, model_name="tiny", max_batch=4, max_queue=64))
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=120)
    system = {"role": "system", "content": "You answer questions about the weather. " * 2}
    greedy = {"max_tokens": 6, "temperature": 0}

    def request(i: int):
        kind = i % 4
        if kind == 0:  # a next turn: the system prompt and an earlier turn again
            turn = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
            msgs = [*turn, {"role": "user", "content": f"Rain on day {i}?"}]
            return "chat", msgs, client.chat.completions.create(model="tiny", messages=msgs, **greedy)
        if kind == 1:  # a new chat
            msgs = [{"role": "user", "content": f"Wind {i}"}]
            return "chat", msgs, client.chat.completions.create(model="tiny", messages=msgs, **greedy)
        if kind == 2:  # a plain completion, long or short
            prompt = "one two three " * (1 + 3 * (i % 3))
            return "text", prompt, client.completions.create(model="tiny", prompt=prompt, **greedy)
        stream = client.chat.completions.create(
            model="tiny",
            messages=[system, {"role": "user", "content": "Sun?"}],
            max_tokens=6,
            n=2,
            stream=True,
        )
        return "stream", None, [c for c in stream]

    results, failures = [None] * 24, []

    def run(i):
        try:
            results[i] = request(i)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    for kind, sent, got in results:
        if kind == "chat":
            alone = client.chat.completions.create(model="tiny", messages=sent, **greedy)
            assert got.choices[0].message.content == alone.choices[0].message.content
        elif kind == "text":
            alone = client.completions.create(model="tiny", prompt=sent, **greedy)
            assert got.choices[0].text == alone.choices[0].text


def test_abandoned_long_requests_hold_only_what_they_used(engine):
    """Requests asking for far more tokens than they get to generate hold KV for what they hold, and
    when their clients leave the rows go at once and a new request is answered."""
    sched = Scheduler(engine.model, engine.tokenizer, max_batch=4, max_queue=8)
    try:
        reqs, started = [], threading.Event()
        for i in range(4):
            reqs.append(
                sched.submit(
                    [5 + i, 6, 7],
                    GenerationParams(max_new_tokens=120, ignore_eos=True),
                    lambda o: started.set(),
                )
            )
        assert started.wait(30)
        while sched.active < 4:
            time.sleep(0.005)
        cache = sched._batch.rows.cache
        held = int(cache.lengths.max())
        assert cache.capacity <= max(int(held * 1.25), held + 64) + 1  # not prompt + max_tokens
        for r in reqs:
            sched.cancel(r)
        got = threading.Event()
        t0 = time.perf_counter()
        sched.submit([9, 9, 9], GenerationParams(max_new_tokens=1), lambda o: got.set())
        assert got.wait(10) and time.perf_counter() - t0 < 1.0
        deadline = time.time() + 5
        while sched.active and time.time() < deadline:
            time.sleep(0.01)
        assert sched.active == 0 and sched._batch.rows.cache is None
    finally:
        sched.close()


class _SlowStream:
    """A stream whose outputs come after `delay` seconds (a request waiting in the queue)."""

    def __init__(self, outs, delay: float):
        self.outs, self.delay, self.cancelled = list(outs), delay, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        await asyncio.sleep(self.delay)
        for out in self.outs:
            yield out

    def cancel(self):
        self.cancelled = True


def test_a_waiting_stream_gets_keepalives():
    """While no output comes for `keepalive` seconds, merged() beats and events() sends an SSE comment;
    without keepalive (the non-streamed path) nothing extra comes."""
    from onnxlm.runtime.serving.choices import merged

    async def gather(keepalive):
        return [item async for item in merged({0: _SlowStream(["a", "b"], 0.25)}, keepalive)]

    got = asyncio.run(gather(0.04))
    assert got[-2:] == [(0, "a"), (0, "b")] and len(got) >= 4  # beats while it waited
    assert all(item == (None, None) for item in got[:-2])
    assert asyncio.run(gather(None)) == [(0, "a"), (0, "b")]


def test_streams_read_the_same_with_keepalives(engine, serve, monkeypatch):
    """With a keepalive shorter than a step, the comments reach the client between events, and the
    OpenAI client's streamed text is still the answer."""
    from onnxlm.runtime.serving import app as A

    monkeypatch.setattr(A, "KEEPALIVE_S", 0.002)
    step = engine.model.step

    def slow_step(*args, **kwargs):  # steps of at least 10 ms: silences longer than the keepalive
        time.sleep(0.01)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.model, "step", slow_step)
    srv = serve(create_app(engine, model_name="tiny", max_batch=2, max_queue=8))
    body = {
        "model": "tiny",
        "prompt": "one two three",
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
    }
    want = http("POST", srv.base + "/v1/completions", json=body).json()["choices"][0]["text"]
    with httpx.stream("POST", srv.base + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert ": keepalive" in lines
    assert all(line.startswith("data: ") or line == ": keepalive" for line in lines)
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=60)
    plain = {k: v for k, v in body.items() if k != "ignore_eos"}
    chunks = client.completions.create(**plain, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
