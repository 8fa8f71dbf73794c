"""Continuous batching: one loop, on its own thread, advances every active sequence together one decode
round at a time; new requests are prefilled a chunk at a time between rounds (a long prompt slows the
running streams but never freezes them) and then join; finished or cancelled ones leave at once, and
their KV rows with them (into the prefix cache, when there is one).

    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=8, max_queue=64)
    stream = scheduler.open_stream(prompt_ids, GenerationParams(max_new_tokens=32))  # QueueFull: busy
    async for out in stream:                                                        # SeqOutput per token
        print(out.text, end="")

The batch is batch.py's `Batch` (the driver, speculation, prefix reuse), the same code `Engine.generate`
runs; this module only decides who is in it and when.
onnxruntime releases the GIL while a step runs, so an asyncio server on the main thread stays responsive.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .batch import Admission, Batch
from .generate import GenerationParams, Model, SeqOutput, SeqState, check_prompts, new_seq
from .prefix import PrefixCache
from .tokenizer import Tokenizer

log = logging.getLogger("onnxlm.serving")


class QueueFull(RuntimeError):
    """Every batch row is busy and the waiting queue is full: try again later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationAborted(RuntimeError):
    """The request was ended by the server (shutdown, or an error in the batch it ran in)."""


class Cancelled(GenerationAborted):
    """The stream was cancelled by its consumer (the client went away)."""


@dataclass
class Request:
    seq: SeqState
    deliver: Callable[[SeqOutput | BaseException], None]  # called on the scheduler thread
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


# --- the scheduler ------------------------------------------------------------------------------------
class Scheduler:
    """A bounded queue in front of one batch that rows join and leave between decode steps."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer | None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int | None = 512,
        speculator=None,
        prefix_cache: PrefixCache | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self._batch = Batch(model, prefill_chunk, speculator, prefix_cache)
        self.prefix_cache = self._batch.prefix_cache
        self.speculator = speculator
        self._rows: list[Request] = []  # aligned with the batch's rows
        self._admission: Admission | None = None  # a prefill in flight, run a chunk between decode rounds
        self._joining: list[Request] = []  # its requests
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abort: str | None = None
        self._ids = itertools.count(1)
        self.steps = 0  # decode rounds run
        self.step_s = 0.0  # seconds of the last decode round (a hint for Retry-After)
        self.prefill_rate = 0.0  # prompt tokens per second of the last prefill chunks (EMA)

    # --- state, for metrics and readiness ------------------------------------------------------------
    def work(self) -> dict[str, float]:
        """Counts of work saved: prefix-cache hits and reused tokens, drafted and accepted tokens."""
        out: dict[str, float] = {}
        if self.prefix_cache is not None:
            st = self.prefix_cache.stats()
            out.update(
                prefix_cache_hits=st["hits"],
                prefix_cache_misses=st["misses"],
                prefix_cache_reused_tokens=st["reused_tokens"],
            )
        if self.speculator is not None:
            out.update(draft_tokens=self.speculator.drafted, draft_accepted_tokens=self.speculator.accepted)
        return out

    def memory(self) -> dict[str, float]:
        """Bytes of KV held: the running batch's buffers and the prefix cache's entries (read from
        another thread: a snapshot, not a lock-step figure)."""
        cache = self._batch.rows.cache
        try:
            kv = cache.nbytes() if cache is not None else 0
        except (AttributeError, TypeError):  # the buffers were swapped while we looked
            kv = 0
        return {
            "kv_cache_bytes": kv,
            "prefix_cache_bytes": self.prefix_cache.nbytes if self.prefix_cache else 0,
        }

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def stopped(self) -> bool:
        """Closed, or started and its loop thread is gone: it will serve nothing more."""
        return self._closing or (self._thread is not None and not self._thread.is_alive())

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._closing:
                raise GenerationAborted("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="onnxlm-scheduler", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; whatever is still waiting or running ends with GenerationAborted."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(GenerationAborted("the server is shutting down"))

    def abort_all(self, message: str) -> None:
        """End every waiting and running request with GenerationAborted(message) before the next step."""
        with self._cv:
            self._abort = message
            self._cv.notify_all()

    # --- submitting -----------------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: GenerationParams,
        deliver: Callable[[SeqOutput | BaseException], None],
    ) -> Request:
        """Queue a request; `deliver` gets each SeqOutput (the last has a finish_reason) or one exception.
        Raises ValueError for a bad prompt and QueueFull at once when the server is at capacity."""
        (ids,) = check_prompts([prompt], self.model.facts)
        req = Request(new_seq(ids, params, self.tokenizer, self.model.facts), deliver)
        self.start()
        with self._cv:
            if len(self._waiting) + len(self._rows) + len(self._joining) >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity ({self.max_batch} running, {len(self._waiting)} waiting); "
                    "retry later",
                    retry_after=max(1.0, round(self.step_s * 16, 1)),
                )
            req.id = next(self._ids)
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client left): it leaves the batch before the next step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def open_stream(self, prompt: Sequence[int], params: GenerationParams) -> Stream:
        """Submit from asyncio code; the result is an async iterator of SeqOutput. Call it from the
        event loop that will iterate it."""
        return Stream(self, prompt, params, asyncio.get_running_loop())

    # --- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._abort or self._waiting or self._rows or self._admission):
                    self._cv.wait()
                if self._closing:
                    return
                abort, self._abort = self._abort, None
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                admit = []
                if self._admission is None:
                    while self._waiting and len(self._rows) + len(admit) < self.max_batch and not abort:
                        admit.append(self._waiting.popleft())
            if abort:
                self._fail_all(GenerationAborted(abort))
                continue
            try:
                self._leave([row for row, r in enumerate(self._rows) if r.cancelled])
                if admit:
                    self._admission = self._batch.admit([r.seq for r in admit])
                    self._joining = admit
                if self._admission is not None:
                    self._prefill_chunk()
                if self._rows:
                    self._decode()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                everyone = [*self._rows, *self._joining]
                log.exception("generation step failed; ending the %d request(s) in it", len(everyone))
                err = GenerationAborted(f"generation failed: {type(e).__name__}: {e}")
                for r in everyone:
                    _deliver(r, err)
                self._reset()

    def _chunk(self) -> int | None:
        """Prompt positions per prefill call: everything up to prefill_chunk while nobody is decoding;
        with running streams, about one of their decode rounds' worth (measured prefill speed, which
        falls as the prompt's past grows), so a long prompt at most doubles their inter-token time
        instead of freezing them."""
        if not self._rows or not self.prefill_chunk:
            return self.prefill_chunk
        if not self.prefill_rate or not self.step_s:
            return min(32, self.prefill_chunk)
        return int(min(self.prefill_chunk, max(8, self.step_s * self.prefill_rate)))

    def _prefill_chunk(self) -> None:
        adm = self._admission
        assert adm is not None
        if all(r.cancelled for r in self._joining):
            adm.free()
            self._admission, self._joining = None, []
            return
        before, spent = adm.pending, adm.seconds
        done = adm.step(self._chunk())
        ran, secs = before - adm.pending, adm.seconds - spent
        if ran > 0 and secs > 0:
            rate = ran * len(adm.seqs) / secs
            self.prefill_rate = rate if not self.prefill_rate else 0.5 * self.prefill_rate + 0.5 * rate
        if not done:
            return
        joined, self._admission, self._joining = self._joining, None, []
        outputs = self._batch.join(adm)
        first = len(self._rows)
        self._rows.extend(joined)
        for r, out in zip(joined, outputs, strict=True):
            _deliver(r, out)
        self._leave([first + i for i, r in enumerate(joined) if r.seq.finish_reason or r.cancelled])

    def _decode(self) -> None:
        t0 = time.perf_counter()
        emitted = self._batch.step()  # per row, 1 + accepted drafts
        self.step_s = time.perf_counter() - t0
        self.steps += 1
        for r, outs in zip(self._rows, emitted, strict=True):
            for out in outs:
                _deliver(r, out)
        self._leave([row for row, r in enumerate(self._rows) if r.seq.finish_reason or r.cancelled])

    def _leave(self, rows: list[int]) -> None:
        """Remove rows from the batch; highest first, so the last row that moves in is never one to drop."""
        self._batch.leave(rows)
        for row in sorted(set(rows), reverse=True):
            last = self._rows.pop()
            if row < len(self._rows):
                self._rows[row] = last

    def _reset(self) -> None:
        self._rows, self._joining = [], []
        if self._admission is not None:
            self._admission.free()
            self._admission = None
        self._batch.free()

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            everyone = [*self._rows, *self._joining, *self._waiting]
            self._waiting = collections.deque()
            self._reset()
        for r in everyone:
            _deliver(r, err)


def _deliver(req: Request, item: SeqOutput | BaseException) -> None:
    if req.cancelled:
        return
    try:
        req.deliver(item)
    except Exception:  # a consumer's bug must not stop the batch
        log.exception("delivering request %d's output failed", req.id)


class Stream:
    """An async iterator over one request's SeqOutputs; closing it (or leaving `async with`) before the
    end cancels the request, so a client that goes away frees its batch row within a step."""

    def __init__(
        self, scheduler: Scheduler, prompt, params: GenerationParams, loop: asyncio.AbstractEventLoop
    ):
        self._queue: asyncio.Queue[SeqOutput | BaseException] = asyncio.Queue()
        self._loop = loop
        self._scheduler = scheduler
        self._done = False
        self.request = scheduler.submit(prompt, params, self._put)

    def _put(self, item: SeqOutput | BaseException) -> None:  # on the scheduler thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.request.cancelled = True

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> SeqOutput:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting (the client left)
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        """Stop generating; an iteration waiting for the next token ends with Cancelled."""
        if not self._done:
            self._done = True
            self._scheduler.cancel(self.request)
            self._queue.put_nowait(Cancelled("the stream was cancelled"))

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()
