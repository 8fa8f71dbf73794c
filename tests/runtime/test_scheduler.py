"""Continuous batching without HTTP: rows join and leave the KV caches (no model needed), and the
scheduler's outputs equal `Engine.generate` of each request alone, on the plain and the fused graph,
whenever requests arrive."""

import threading
import time

import numpy as np
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.generate import GenerationParams
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.scheduler import GenerationAborted, QueueFull, Scheduler
from onnxlm.runtime.shared_kv import SharedKVCache

L, H, D = 2, 2, 4


# --- the caches ---------------------------------------------------------------------------------------
def filled_shared(lengths, capacity=8, start=0):
    """A shared cache whose row b holds lengths[b] slots valued start + 100 * b + position."""
    cache = SharedKVCache(L, H, D, batch=len(lengths), capacity=capacity)
    cache.feeds(lengths)
    for j, arr in enumerate(cache._arrays):
        for b, n in enumerate(lengths):
            arr[b, :, :n] = (start + 100 * b + np.arange(n))[None, :, None] * (1 if j % 2 == 0 else -1)
    cache.advance()
    return cache


def row_values(cache, b):
    k, _ = cache.layer(0)
    return k[b, 0, : cache.lengths[b], 0].tolist()


def test_shared_append_keeps_every_row_and_grows_room_and_capacity():
    a = filled_shared([3, 5])
    b = filled_shared([7], capacity=7, start=1000)
    a.append(b)
    assert a.batch == 3 and a.lengths.tolist() == [3, 5, 7]
    assert row_values(a, 0) == [0, 1, 2]
    assert row_values(a, 1) == [100, 101, 102, 103, 104]
    assert row_values(a, 2) == [1000 + i for i in range(7)]
    assert a._bases[0].shape[0] >= 4  # spare rows: the next joiner needs no new buffer
    base = a._bases[0]
    a.append(filled_shared([2], capacity=2, start=5000))
    assert a._bases[0] is base and row_values(a, 3) == [5000, 5001]
    b.free()
    a.append(filled_shared([12], capacity=12, start=7000))  # longer than the capacity: buffers grow
    assert a.capacity >= 12 and row_values(a, 4) == [7000 + i for i in range(12)]
    assert row_values(a, 1) == [100, 101, 102, 103, 104]
    _, v = a.layer(0)
    assert v[2, 0, :7, 0].tolist() == [-(1000 + i) for i in range(7)]


def test_shared_drop_moves_only_the_last_row_and_reserve_keeps_slots():
    a = filled_shared([3, 5, 2, 4])
    assert a.drop(1) == 3  # the last row moves into the gap
    assert a.batch == 3 and a.lengths.tolist() == [3, 4, 2]
    assert [row_values(a, b) for b in range(3)] == [[0, 1, 2], [300, 301, 302, 303], [200, 201]]
    assert a.drop(2) is None and a.lengths.tolist() == [3, 4]
    a.reserve(32)
    assert a.capacity == 32 and [row_values(a, b) for b in range(2)] == [[0, 1, 2], [300, 301, 302, 303]]
    feeds = a.feeds([1, 1])
    assert feeds["seqlens_k"].tolist() == [3, 4] and feeds["past_key_values.0.key"].shape() == [2, H, 32, D]
    with pytest.raises(ValueError, match="cannot drop"):
        filled_shared([2]).drop(0)


def concat_cache(lengths, start=0):
    cache = KVCache(L, H, D, batch=len(lengths))
    width = max(lengths)
    keys = np.zeros((len(lengths), H, width, D), np.float32)
    for b, n in enumerate(lengths):
        keys[b, :, width - n :] = (start + 100 * b + np.arange(n))[None, :, None]
    cache.keys = [keys.copy() for _ in range(L)]
    cache.values = [-keys.copy() for _ in range(L)]
    return cache


def test_concat_append_pads_the_shorter_side_on_the_left_and_trim_front_drops_padding():
    a = concat_cache([2])
    assert a.append(concat_cache([4], start=1000)) == (2, 0)
    k, v = a.layer(1)
    assert k.shape == (2, H, 4, D)
    assert k[0, 0, :, 0].tolist() == [0, 0, 0, 1] and k[1, 0, :, 0].tolist() == [1000, 1001, 1002, 1003]
    assert a.append(concat_cache([1], start=7)) == (0, 3)
    assert a.batch == 3 and a.layer(0)[0][2, 0, :, 0].tolist() == [0, 0, 0, 7]
    assert a.drop(1) == 2 and a.batch == 2
    assert a.layer(0)[0][:, 0, :, 0].tolist() == [[0, 0, 0, 1], [0, 0, 0, 7]]
    a.trim_front(2)
    assert a.offset == 2 and a.layer(0)[1][:, 0, :, 0].tolist() == [[0, -1], [0, -7]]


# --- the scheduler on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(bundle):
    return load(bundle.path, threads=1)


class Collector:
    """Gathers one request's outputs from the scheduler thread."""

    def __init__(self, on_token=None):
        self.outputs, self.error, self.done = [], None, threading.Event()
        self.on_token = on_token

    def __call__(self, item):
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.outputs.append(item)
        if self.on_token:
            self.on_token(len(self.outputs))
        if item.finish_reason:
            self.done.set()

    def wait(self):
        assert self.done.wait(60), "the request did not finish"
        return self


PROMPTS = [
    "The quick brown fox",
    "Hello world! This is a much longer prompt for the tiny model",
    "我们",
    "Once",
]


def test_requests_joining_mid_flight_equal_running_alone(engine):
    """Later requests are submitted from the first's token callback, so they join a running batch at a
    known step; every result equals the engine's single-request generate (greedy and seeded)."""
    sched = Scheduler(engine.model, engine.tokenizer, max_batch=3, max_queue=4)
    cases = [
        dict(max_new_tokens=24, ignore_eos=True, logprobs=True),
        dict(max_new_tokens=9, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7, logprobs=True),
        dict(max_new_tokens=30, ignore_eos=True, temperature=1.2, seed=3, logprobs=True),
        dict(max_new_tokens=5, ignore_eos=True, logprobs=True),
    ]
    collectors: list[Collector] = []
    batch_sizes = []

    def on_token(i, n):
        batch_sizes.append(sched.active)
        if i + 1 < len(cases) and n == 3:
            submit(i + 1)

    def submit(i):
        c = Collector(on_token=lambda n, i=i: on_token(i, n))
        collectors.append(c)
        sched.submit(engine.tokenizer.encode(PROMPTS[i]), GenerationParams(**cases[i]), c)

    try:
        submit(0)
        for c in collectors[:1]:
            c.wait()
        deadline = time.time() + 60
        while len(collectors) < len(cases) and time.time() < deadline:
            time.sleep(0.01)
        for c in collectors:
            c.wait()
        assert sched.active == 0 and sched.queue_depth == 0
        assert sched._batch.rows.cache is None  # every row left: nothing held
        assert max(batch_sizes) == 3  # requests really ran together
    finally:
        sched.close()
    for i, c in enumerate(collectors):
        alone = engine.generate(PROMPTS[i], **cases[i])
        assert [o.token_id for o in c.outputs] == alone.token_ids, i
        assert "".join(o.text for o in c.outputs) == alone.text
        assert np.allclose([o.logprob for o in c.outputs], alone.logprobs, atol=1e-4)
        assert c.outputs[-1].finish_reason == alone.finish_reason == "length"


def test_cancel_frees_the_row_and_the_queue_is_bounded(engine):
    sched = Scheduler(engine.model, engine.tokenizer, max_batch=1, max_queue=1)
    try:
        started = threading.Event()
        long = Collector(on_token=lambda n: started.set())
        req = sched.submit(
            engine.tokenizer.encode("Once"), GenerationParams(max_new_tokens=120, ignore_eos=True), long
        )
        assert started.wait(30)
        waiting = Collector()
        sched.submit([5, 6, 7], GenerationParams(max_new_tokens=3, ignore_eos=True), waiting)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as info:
            sched.submit([5, 6], GenerationParams(max_new_tokens=3), Collector())
        assert time.perf_counter() - t0 < 0.1 and info.value.retry_after >= 1
        sched.cancel(req)
        waiting.wait()  # the cancelled request left its row to the waiting one
        assert len(waiting.outputs) == 3 and len(long.outputs) < 120 and long.error is None
        assert sched.active == 0 and sched._batch.rows.cache is None
    finally:
        sched.close()


def test_bad_prompts_raise_at_submit_and_abort_ends_everyone(engine):
    sched = Scheduler(engine.model, engine.tokenizer, max_batch=2, max_queue=2)
    try:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sched.submit([1, 10**6], GenerationParams(), Collector())
        with pytest.raises(ValueError, match="context window"):
            sched.submit([5] * engine.context_length, GenerationParams(), Collector())
        started = threading.Event()
        running = [Collector(on_token=lambda n: started.set()) for _ in range(3)]
        for c in running:
            sched.submit([5, 6], GenerationParams(max_new_tokens=200, ignore_eos=True), c)
        assert started.wait(30)
        sched.abort_all("shutting down")
        for c in running:
            c.wait()
            assert isinstance(c.error, GenerationAborted) and "shutting down" in str(c.error)
        after = Collector()
        sched.submit([5, 6], GenerationParams(max_new_tokens=2, ignore_eos=True), after)
        assert after.wait().error is None and len(after.outputs) == 2  # the loop lives on
    finally:
        sched.close()
