"""The OpenAI-compatible HTTP app (Starlette): handlers check the request, enqueue it with the
scheduler and stream the outputs back; one loop (the scheduler's) does all generation.

    from onnxlm.runtime import load
    from onnxlm.runtime.serving.app import create_app
    app = create_app(load("bundle/"), api_key="secret")    # mount it in your own ASGI app, or:
    uvicorn.run(app, host="127.0.0.1", port=8000)           # (`onnxlm serve` adds SIGTERM draining)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with `stream: true`:
server-sent events ending in `data: [DONE]`), POST /tokenize, POST /detokenize, GET /tokenizer_info,
GET /health, GET /ready, GET /metrics (Prometheus). Which request fields are honoured: openai_fields.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import Engine
from ..scheduler import Cancelled, GenerationAborted, QueueFull, Scheduler
from .choices import cancel, collect, events, open_streams, queue_full
from .guard import HostGuard, HostPolicy, check_encodable, check_json_content_type
from .metrics import ServerMetrics
from .protocol import APIError, GenRequest, bad, parse_chat, parse_completion, parse_json
from .responses import LogprobText, cached_tokens, completion_body, new_id, prompt_logprobs
from .tokens import detokenize, tokenize, tokenizer_info

log = logging.getLogger("onnxlm.serving")

MAX_BODY_BYTES = 4 * 1024 * 1024
PREP_THREADS = 2  # parsing, template rendering and tokenizing run here, never on the event loop


class Service:
    """What the handlers share: the engine, its scheduler, the metrics, the key, the draining flag."""

    def __init__(
        self,
        engine: Engine,
        model_name: str | None = None,
        api_key: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        scheduler: Scheduler | None = None,
    ):
        self.engine = engine
        self.model_name = model_name or (engine.bundle_dir.name if engine.bundle_dir else "onnxlm")
        self.api_key = api_key or None
        self.scheduler = scheduler or engine.new_scheduler(max_batch, max_queue)
        self.metrics = ServerMetrics(
            lambda: self.scheduler.queue_depth,
            lambda: self.scheduler.active,
            self.scheduler.work,
            self.scheduler.memory,
        )
        self.text = LogprobText(engine)
        self.draining = False
        self.created = int(time.time())
        self.prep = concurrent.futures.ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="onnxlm-prep")
        # requests being parsed and tokenized: past what the scheduler could take anyway, refuse (429)
        # rather than hold more bodies in memory
        self.preparing, self.max_preparing = 0, max_batch + max_queue

    def drain(self) -> None:
        """Refuse new generation requests (503) and report not ready; running ones go on."""
        self.draining = True

    def not_ready(self) -> str | None:
        """Why this server should get no new requests, or None (GET /ready; Ray's replica health check)."""
        if self.draining:
            return "draining"
        if self.scheduler.stopped:
            return "the generation loop has stopped"
        return None

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _endpoint(name: str, auth: bool = True):
    """Auth, OpenAI-style errors for every APIError, and the request counter, around one handler."""

    def wrap(handler: Callable[[Service, Request], Awaitable[Response]]):
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            svc: Service = request.app.state.service
            try:
                if auth and not svc.authorized(request):
                    raise APIError(
                        401,
                        "invalid or missing API key: send 'Authorization: Bearer <key>'",
                        type="invalid_request_error",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                response = await handler(svc, request)
            except APIError as e:
                response = error_response(e)
            except ClientDisconnect:
                response = Response(status_code=499)
            if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
                svc.metrics.requests.inc(1, name, str(response.status_code))
            return response

        return run

    return wrap


async def _read_body(request: Request) -> bytes:
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


# --- handlers ------------------------------------------------------------------------------------------
@_endpoint("/health", auth=False)
async def health(svc: Service, request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@_endpoint("/ready")
async def ready(svc: Service, request: Request) -> Response:
    reason = svc.not_ready()
    if reason == "draining":
        return JSONResponse({"status": "draining"}, status_code=503)
    if reason:
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready", "model": svc.model_name})


@_endpoint("/metrics")
async def metrics(svc: Service, request: Request) -> Response:
    replica = getattr(request.app.state, "replica", None)  # set under Ray Serve: which replica answered
    if replica is not None:
        svc.metrics.set_replica(replica)
    body, content_type = svc.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)


def _model_card(svc: Service) -> dict:
    return {"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "onnxlm"}


@_endpoint("/v1/models")
async def models(svc: Service, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(svc)]})


@_endpoint("/v1/models/{model}")
async def model(svc: Service, request: Request) -> Response:
    if request.path_params["model"] != svc.model_name:
        raise APIError(
            404,
            f"no model {request.path_params['model']!r}; this server serves {svc.model_name!r}",
            code="model_not_found",
            param="model",
        )
    return JSONResponse(_model_card(svc))


@_endpoint("/v1/completions")
async def completions(svc: Service, request: Request) -> Response:
    return await _generate(svc, request, chat=False)


@_endpoint("/v1/chat/completions")
async def chat_completions(svc: Service, request: Request) -> Response:
    return await _generate(svc, request, chat=True)


class _Track:
    """Times one request's tokens into the metrics."""

    def __init__(self, svc: Service, endpoint: str, req: GenRequest):
        self.metrics, self.endpoint, self.req = svc.metrics, endpoint, req
        self.start = self.last = time.perf_counter()
        self.tokens = 0

    def token(self) -> None:
        now = time.perf_counter()
        (self.metrics.ttft if self.tokens == 0 else self.metrics.itl).observe(now - self.last)
        self.last, self.tokens = now, self.tokens + 1

    def end(self, status: str | None) -> None:
        m = self.metrics
        m.prompt_tokens.inc(self.req.prompt_tokens)
        m.completion_tokens.inc(self.tokens)
        m.duration.observe(time.perf_counter() - self.start)
        if status is not None:
            m.requests.inc(1, self.endpoint, status)


async def _generate(svc: Service, request: Request, chat: bool) -> Response:
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if svc.draining:
        raise APIError(
            503,
            "the server is shutting down",
            type="server_error",
            code="server_shutting_down",
            headers={"Retry-After": "5"},
        )
    raw = await _read_body(request)
    if svc.preparing >= svc.max_preparing:
        raise APIError(
            429,
            f"{svc.preparing} requests are being prepared already; try again shortly",
            type="rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    svc.preparing += 1  # (the event loop's own counter: no lock needed)
    try:
        # JSON parsing, the chat template and the tokenizer take seconds on a large body: off the loop
        req = await asyncio.get_running_loop().run_in_executor(svc.prep, _prepare, raw, chat, svc.engine)
    finally:
        svc.preparing -= 1
    _check_model(svc, req.model)
    echoes = await _echoes(svc, req)
    try:
        streams = open_streams(svc.scheduler, req)
    except QueueFull as e:
        raise queue_full(e) from None
    except ValueError as e:
        raise bad(str(e)) from None
    except GenerationAborted as e:
        raise APIError(503, str(e), type="server_error", code="server_shutting_down") from None
    track = _Track(svc, endpoint, req)
    rid, name = new_id(chat), svc.model_name
    if req.stream:
        events = _events(svc, req, streams, echoes, track, rid, name)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    watcher = asyncio.ensure_future(_on_disconnect(request, streams))
    try:
        results = await collect(streams, req, track.token)
    except Cancelled:
        return Response(status_code=499)  # the client is gone; nobody reads this (_endpoint counts it)
    except GenerationAborted as e:
        raise APIError(503, str(e), type="server_error", code="generation_aborted") from None
    finally:
        watcher.cancel()
        cancel(streams)
        track.end(None)  # a response that is not a stream is counted once, by _endpoint
    cached = cached_tokens(req, streams)
    return JSONResponse(completion_body(req, rid, name, results, svc.text, echoes, cached))


def _check_model(svc: Service, model: str) -> None:
    if model and model != svc.model_name:
        raise APIError(
            404,
            f"no model {model!r}; this server serves {svc.model_name!r}",
            code="model_not_found",
            param="model",
        )


async def _echoes(svc: Service, req: GenRequest) -> dict[int, list]:
    """With echo and logprobs: each prompt's token logprobs (a forward pass each, one prompt at a time:
    a prompt's logits are (tokens, vocab) floats; off the event loop)."""
    if not (req.echo and req.logprobs):
        return {}
    top = req.params.top_logprobs

    def score() -> list:
        return [prompt_logprobs(svc.engine, ids, top) for ids in req.prompts]

    return dict(enumerate(await asyncio.to_thread(score)))


def _prepare(raw: bytes, chat: bool, engine: Engine) -> GenRequest:
    """The checked request from the body's bytes (runs on the prep threads)."""
    body = parse_json(raw)
    check_encodable(body)
    return (parse_chat if chat else parse_completion)(body, engine)


async def _on_disconnect(request: Request, streams: dict) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel(streams)
            return


# A stream silent this long (queued, behind a long prefill) gets an SSE comment (choices.events).
KEEPALIVE_S = 15.0


async def _events(
    svc: Service, req: GenRequest, streams: dict, echoes: dict, track: _Track, rid: str, name: str
) -> AsyncIterator[str]:
    """Server-sent events (choices.events), counted into the metrics with how they ended."""
    status = "200"
    source = events(req, streams, svc.text, echoes, rid, name, int(time.time()), track.token, KEEPALIVE_S)
    try:
        async for event in source:
            if event.startswith('data: {"error"'):
                status = "503"
            yield event
    except Cancelled:
        status = "499"
        return
    except BaseException:  # cancelled by Starlette: the client disconnected
        status = "499"
        raise
    finally:
        cancel(streams)
        track.end(status)


@_endpoint("/tokenize")
async def tokenize_endpoint(svc: Service, request: Request) -> Response:
    return JSONResponse(tokenize(parse_json(await _read_body(request)), svc.engine))


@_endpoint("/tokenizer_info")
async def tokenizer_info_endpoint(svc: Service, request: Request) -> Response:
    return JSONResponse(tokenizer_info(svc.engine))


@_endpoint("/detokenize")
async def detokenize_endpoint(svc: Service, request: Request) -> Response:
    return JSONResponse(detokenize(parse_json(await _read_body(request)), svc.engine))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(APIError(500, "internal server error", type="server_error"))


def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    scheduler: Scheduler | None = None,
    allowed_hosts: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
) -> Starlette:
    """The OpenAI-compatible ASGI app for one engine. The scheduler thread starts with the first request
    (so a parent app that mounts this one need not run its lifespan); `app.state.service` holds the
    state, and `app.state.service.scheduler.close()` stops generation.

    Without an API key only requests whose Host is a loopback name or one of `allowed_hosts` ('*' for
    any) are answered. CORS is off unless `cors_origins` names the web origins allowed to call."""
    svc = Service(engine, model_name, api_key, max_batch, max_queue, scheduler)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize_endpoint, methods=["POST"]),
        Route("/detokenize", detokenize_endpoint, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info_endpoint, methods=["GET"]),
    ]
    middleware = [Middleware(HostGuard, policy=HostPolicy(allowed_hosts), enabled=svc.api_key is None)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.service = svc
    return app
