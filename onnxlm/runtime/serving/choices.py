"""Running one request's choices: a scheduler stream per (prompt, sample), all in the same batch, their
outputs gathered into one answer or merged into one event stream (chunks carry the choice index)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..generate import SeqOutput
from ..scheduler import GenerationAborted, QueueFull, Scheduler, Stream
from .protocol import APIError, GenRequest
from .responses import ChoiceStream, Entry, LogprobText, cached_tokens, chunk_body, usage


def open_streams(scheduler: Scheduler, req: GenRequest) -> dict[int, Stream]:
    """A stream per choice (none when only the prompt is scored); all or none: a full queue cancels the
    ones already opened."""
    streams: dict[int, Stream] = {}
    if not req.generate:
        return streams
    try:
        for index, ids, params in req.choices():
            streams[index] = scheduler.open_stream(ids, params)
    except BaseException:
        cancel(streams)
        raise
    return streams


def cancel(streams: dict[int, Stream]) -> None:
    for s in streams.values():
        s.cancel()


async def merged(
    streams: dict[int, Stream], keepalive: float | None = None
) -> AsyncIterator[tuple[int | None, SeqOutput | None]]:
    """(choice index, output) from every stream as they come; the first error ends it (and the rest).
    With `keepalive`: (None, None) after each `keepalive` seconds in which no output came."""
    queue: asyncio.Queue = asyncio.Queue()
    beat: asyncio.TimerHandle | None = None
    quiet = [True]  # no output since the last beat

    def tick() -> None:
        nonlocal beat
        if quiet[0]:
            queue.put_nowait((None, None))
        quiet[0] = True
        beat = asyncio.get_running_loop().call_later(keepalive, tick)

    if keepalive:
        beat = asyncio.get_running_loop().call_later(keepalive, tick)

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in streams.items()]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if index is None:
                yield None, None  # a keepalive beat
            elif item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                quiet[0] = False
                yield index, item
    finally:
        if beat is not None:
            beat.cancel()
        cancel(streams)
        for t in tasks:
            t.cancel()


async def collect(
    streams: dict[int, Stream], req: GenRequest, on_token: Callable[[], None]
) -> dict[int, list]:
    results: dict[int, list[SeqOutput]] = {index: [] for index, _, _ in req.choices()}
    async for index, out in merged(streams):
        results[index].append(out)
        on_token()
    return results


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def events(
    req: GenRequest,
    streams: dict[int, Stream],
    text: LogprobText,
    echoes: dict[int, list[Entry]],
    rid: str,
    model: str,
    created: int,
    on_token: Callable[[], None],
    keepalive: float | None = None,
) -> AsyncIterator[str]:
    """Server-sent events for every choice: its start (role, or the echoed prompt), its deltas, its
    finish reason; usage when asked; then [DONE]. A server-side abort sends an error event first.
    With `keepalive`: an SSE comment (which clients skip) after each `keepalive` seconds without
    output, so that a stream waiting in the queue or behind a long prefill is not dropped by a proxy
    or client read timeout (nginx's default is 60 s)."""
    states = {index: ChoiceStream(req, index, text) for index, _, _ in req.choices()}

    def send(choice: dict[str, Any] | None, u: dict | None = None) -> str:
        return _sse(chunk_body(req, rid, model, created, choice, u))

    for index, state in states.items():
        prompt = index // req.n
        for choice in state.start(req.prompt_texts[prompt] if req.echo else "", echoes.get(prompt)):
            yield send(choice)
    try:
        async for index, out in merged(streams, keepalive):
            if index is None:
                yield ": keepalive\n\n"
                continue
            on_token()
            for choice in states[index].push(out):
                yield send(choice)
    except GenerationAborted as e:
        if type(e).__name__ == "Cancelled":
            raise
        yield _sse(APIError(503, str(e), type="server_error", code="generation_aborted").body())
        yield "data: [DONE]\n\n"
        return
    for state in states.values():
        yield send(state.finish())
    if req.include_usage:
        completion = sum(s.tokens for s in states.values())
        yield send(None, usage(req.prompt_tokens, completion, cached_tokens(req, streams)))
    yield "data: [DONE]\n\n"


def queue_full(e: QueueFull) -> APIError:
    import math

    return APIError(
        429,
        str(e),
        type="rate_limit_exceeded",
        code="queue_full",
        headers={"Retry-After": str(math.ceil(e.retry_after))},
    )
