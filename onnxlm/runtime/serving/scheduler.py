"""Continuous batching: one loop, on its own thread, advances every active sequence together one decode
step at a time; new requests are prefilled and join between steps; finished or cancelled ones leave at
once, and their KV rows with them.

    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=8, max_queue=64)
    stream = scheduler.open_stream(prompt_ids, GenerationParams(max_new_tokens=32))  # QueueFull: busy
    async for out in stream:                                                        # SeqOutput per token
        print(out.text, end="")

The sequence logic (sampling, stop strings, detokenizing, finish reasons) is generate.py's `SeqState`
and `sample_next`, the same code `Engine.generate` runs; this module only decides who is in the batch.
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

import numpy as np

from ..constraints import fill_masks
from ..generate import (
    GenerationParams,
    Model,
    SeqOutput,
    SeqState,
    check_prompts,
    decode_step,
    decode_step_shared,
    left_pad,
    new_seq,
    prefill,
    prefill_shared,
    right_pad,
    sample_next,
)
from ..kv_cache import KVCache, SharedKVCache
from ..tokenizer import Tokenizer

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

    def need(self) -> int:
        """KV positions the sequence can come to hold (the last sampled token is never fed back)."""
        return len(self.seq.prompt) + self.seq.limit - 1


# --- the rows of the running batch, for each KV layout ----------------------------------------------
class _SharedRows:
    """Shared-buffer graph: rows of any lengths in one buffer (seqlens_k per row); a joiner is prefilled
    alone in a buffer of its prompt's size, then its filled slots are copied in."""

    def __init__(self, model: Model, pad: int, chunk: int | None):
        self.model, self.pad, self.chunk = model, pad, chunk
        self.cache: SharedKVCache | None = None

    def prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, SharedKVCache]:
        ids, lengths = right_pad(prompts, self.pad)
        part = self.model.new_cache(len(prompts), capacity=int(lengths.max()))
        assert isinstance(part, SharedKVCache)
        return prefill_shared(self.model, part, ids, lengths, self.chunk), part  # (k, vocab)

    def join(self, part: SharedKVCache, need: int) -> None:
        if self.cache is None:
            self.cache = part
        else:
            self.cache.append(part)
            part.free()
        if need > self.cache.capacity:  # grow geometrically: rebuilding copies every row's slots
            ceiling = self.model.facts.context_length
            self.cache.reserve(max(need, min(ceiling, 2 * self.cache.capacity)))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        assert self.cache is not None
        return decode_step_shared(self.model, self.cache, tokens)

    def drop(self, row: int) -> None:
        assert self.cache is not None
        if self.cache.batch == 1:
            self.free()
        else:
            self.cache.drop(row)

    def free(self) -> None:
        if self.cache is not None:
            self.cache.free()
        self.cache = None


class _ConcatRows:
    """Concat graph: left-padded rows; a joiner or the batch is padded on the left to line up, and
    padding columns no row needs any more are trimmed."""

    def __init__(self, model: Model, pad: int, chunk: int | None):
        self.model, self.pad, self.chunk = model, pad, chunk
        self.cache: KVCache | None = None
        self.mask = np.zeros((0, 0), np.int64)  # (batch, offset) 1 on real positions
        self.next_pos = np.zeros(0, np.int64)  # (batch,)

    def prefill(self, prompts: list[list[int]]):
        ids, mask, pos = left_pad(prompts, self.pad)
        part = self.model.new_cache(len(prompts))
        assert isinstance(part, KVCache)
        logits = prefill(self.model, part, ids, mask, pos, self.chunk)
        return logits, (part, mask, mask.sum(axis=1))

    def join(self, part, need: int) -> None:
        cache, mask, next_pos = part
        if self.cache is None:
            self.cache, self.mask, self.next_pos = cache, mask, next_pos
            return
        pad_self, pad_other = self.cache.append(cache)
        self.mask = np.concatenate(
            [np.pad(self.mask, ((0, 0), (pad_self, 0))), np.pad(mask, ((0, 0), (pad_other, 0)))]
        )
        self.next_pos = np.concatenate([self.next_pos, next_pos])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        assert self.cache is not None
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), self.mask.dtype)], axis=1)
        logits = decode_step(self.model, self.cache, tokens, self.mask, self.next_pos)
        self.next_pos = self.next_pos + 1
        return logits

    def drop(self, row: int) -> None:
        assert self.cache is not None
        if self.cache.batch == 1:
            self.free()
            return
        moved = self.cache.drop(row)
        if moved is not None:
            self.mask[row], self.next_pos[row] = self.mask[moved], self.next_pos[moved]
        self.mask, self.next_pos = self.mask[:-1], self.next_pos[:-1]
        unused = int(np.argmax(self.mask.any(axis=0)))  # leading columns that are padding in every row
        if unused >= max(32, self.mask.shape[1] // 4):
            self.cache.trim_front(unused)
            self.mask = self.mask[:, unused:]

    def free(self) -> None:
        self.cache = None
        self.mask, self.next_pos = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)


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
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        facts = model.facts
        pad = facts.pad_token_id if facts.pad_token_id is not None else (facts.eos_token_ids or [0])[0]
        self._batch = (_SharedRows if model.io.shared else _ConcatRows)(model, pad, prefill_chunk)
        self._rows: list[Request] = []  # aligned with the batch's cache rows
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abort: str | None = None
        self._ids = itertools.count(1)
        self.steps = 0  # decode steps run
        self.step_s = 0.0  # seconds of the last decode step (a hint for Retry-After)

    # --- state, for metrics and readiness ------------------------------------------------------------
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
            if len(self._waiting) + len(self._rows) >= self.max_batch + self.max_queue:
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
                while not (self._closing or self._abort or self._waiting or self._rows):
                    self._cv.wait()
                if self._closing:
                    return
                abort, self._abort = self._abort, None
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                admit = []
                while self._waiting and len(self._rows) + len(admit) < self.max_batch and not abort:
                    admit.append(self._waiting.popleft())
            if abort:
                self._fail_all(GenerationAborted(abort))
                continue
            try:
                self._leave([row for row, r in enumerate(self._rows) if r.cancelled])
                if admit:
                    self._prefill(admit)
                    admit = []
                if self._rows:
                    self._decode()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                log.exception(
                    "generation step failed; ending the %d request(s) in it", len(self._rows) + len(admit)
                )
                err = GenerationAborted(f"generation failed: {type(e).__name__}: {e}")
                for r in [*self._rows, *admit]:
                    _deliver(r, err)
                self._rows = []
                self._batch.free()

    def _prefill(self, admit: list[Request]) -> None:
        logits, part = self._batch.prefill([r.seq.prompt for r in admit])  # (k, vocab)
        fill_masks([r.seq for r in admit])
        outputs = [sample_next(r.seq, 0, logits[i]) for i, r in enumerate(admit)]
        first = len(self._rows)
        self._rows.extend(admit)
        self._batch.join(part, max(r.need() for r in self._rows))
        for r, out in zip(admit, outputs, strict=True):
            _deliver(r, out)
        self._leave([first + i for i, r in enumerate(admit) if r.seq.finish_reason or r.cancelled])

    def _decode(self) -> None:
        tokens = np.array([r.seq.tokens[-1] for r in self._rows], dtype=np.int64)
        t0 = time.perf_counter()
        logits = self._batch.decode(tokens)  # (batch, vocab)
        self.step_s = time.perf_counter() - t0
        self.steps += 1
        fill_masks([r.seq for r in self._rows])
        for row, r in enumerate(self._rows):
            _deliver(r, sample_next(r.seq, 0, logits[row]))
        self._leave([row for row, r in enumerate(self._rows) if r.seq.finish_reason or r.cancelled])

    def _leave(self, rows: list[int]) -> None:
        """Remove rows from the batch; highest first, so the last row that moves in is never one to drop."""
        for row in sorted(rows, reverse=True):
            self._batch.drop(row)
            last = self._rows.pop()
            if row < len(self._rows):
                self._rows[row] = last

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            everyone = [*self._rows, *self._waiting]
            self._rows, self._waiting = [], collections.deque()
        self._batch.free()
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
