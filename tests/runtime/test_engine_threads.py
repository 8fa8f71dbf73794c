"""Engine is thread-safe as documented: threads sharing one Engine each get what they would alone."""

import concurrent.futures
import threading
import time

from onnxlm.runtime import load
from tests.bundles import tiny_bundle

PROMPTS = [
    "The quick brown fox",
    "Hello world!",
    "我们今天",
    "Once upon a time",
    "Numbers 0 1 2",
    "Marketing",
]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS]


def _jobs(engine):
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        jobs.append(lambda p=prompt: engine.generate(p, max_new_tokens=16, ignore_eos=True).token_ids)
        jobs.append(
            lambda p=prompt, s=i: engine.generate(p, max_new_tokens=12, temperature=0.9, seed=s).token_ids
        )
        jobs.append(lambda m=CHATS[i]: engine.chat(m, max_new_tokens=8).token_ids)
    return jobs


def test_threads_on_one_engine_get_what_each_gets_alone():
    for graph, draft in (("fused", None), ("plain", None), ("fused", "ngram")):
        alone = _jobs(load(tiny_bundle(graph).path, threads=1, draft=draft))
        expected = [job() for job in alone]
        # a fresh engine: the template compiles and the prefix cache fills while the threads run
        shared = load(tiny_bundle(graph).path, threads=1, draft=draft)
        barrier = threading.Barrier(4)

        def run(job, barrier=barrier):
            try:
                barrier.wait(timeout=5)  # the first four start together
            except threading.BrokenBarrierError:
                pass
            return job()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, _jobs(shared) * 2))
        assert got == expected * 2, (graph, draft)


def test_the_scheduler_is_made_once_however_many_threads_ask(monkeypatch):
    from onnxlm.runtime.scheduler import Scheduler

    engine = load(tiny_bundle("fused").path, threads=1)
    barrier = threading.Barrier(8)
    made = Scheduler.__init__

    def slow_init(self, *args, **kwargs):  # widen the window a check-then-create race would need
        time.sleep(0.05)
        made(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "__init__", slow_init)

    def ask(_):
        barrier.wait(timeout=10)
        return engine.scheduler()

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            schedulers = list(pool.map(ask, range(8)))
        assert len({id(s) for s in schedulers}) == 1
        alive = [t for t in threading.enumerate() if "sched" in t.name.lower()]
        assert len(alive) <= 1, alive
    finally:
        engine.scheduler().close()
