"""`onnxlm serve`: the app under uvicorn, with draining on SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections, answers 503 on kept-alive ones, lets
running streams finish for `grace` seconds, then ends the rest with an error event and `[DONE]`, and
exits 0. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from .guard import host_name, is_loopback, is_wildcard_bind

log = logging.getLogger("onnxlm.serving")


def _web_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(
            f"`onnxlm serve` needs the serve extra: pip install 'onnxlm[serve]' ({e})"
        ) from None
    return uvicorn


def read_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key from the option or from the first line of a file (so it stays out of `ps`)."""
    if api_key and api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if api_key_file:
        lines = Path(api_key_file).read_text().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{api_key_file}: the API key file is empty")
        return lines[0].strip()
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    return api_key.strip() if api_key else None


def serve(
    bundle: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    model_name: str | None = None,
    grace: float = 30.0,
    providers=None,
    threads: int | None = None,
    draft: str | None = None,
    prefix_cache_mb: float = 256,
    draft_inexact: bool = False,
    allowed_hosts: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
) -> None:
    """Load BUNDLE and serve the OpenAI API on host:port until SIGTERM / Ctrl-C; `draft` ("ngram" or a
    draft bundle) turns on speculative decoding, `prefix_cache_mb` sizes the prefix cache (0: off).

    Without an API key, requests must name the server by a loopback name, the bound address or one of
    `allowed_hosts`; `cors_origins` lets those web origins call it from a browser."""
    uvicorn = _web_stack()
    from ..engine import Engine
    from .app import create_app

    if max_batch < 1 or max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch}, {max_queue}")
    engine = Engine.load(
        bundle,
        providers=providers,
        threads=threads,
        draft=draft,
        prefix_cache_mb=prefix_cache_mb,
        draft_inexact=draft_inexact,
    )
    hosts = [*allowed_hosts, *([] if is_wildcard_bind(host) else [host])]
    app = create_app(
        engine,
        model_name=model_name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        allowed_hosts=hosts,
        cors_origins=cors_origins,
    )
    svc = app.state.service
    svc.scheduler.start()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=grace + 5,  # a backstop: the abort below ends streams at `grace`
        lifespan="off",
    )
    server = _DrainingServer(config, svc, grace)
    log.warning(
        "serving %s as %r on http://%s:%d/v1 (batch %d, queue %d%s)",
        bundle,
        svc.model_name,
        host,
        port,
        max_batch,
        max_queue,
        ", API key required" if api_key else "",
    )
    warning = exposure_warning(host, api_key)
    if warning:
        log.warning("%s", warning)
    try:
        server.run()
    finally:
        server.cancel_timer()
        svc.scheduler.close()
    log.warning("stopped")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one line printed at start when a server without a key listens beyond loopback (the Host check
    stops browsers, not other programs on the network)."""
    if api_key or is_loopback(host_name(host)):
        return None
    return (
        f"WARNING: no API key and listening on {host}: any program that can reach this port can use "
        "the model; pass --api-key-file to require a key"
    )


class _DrainingServer:
    """uvicorn.Server whose first signal drains instead of re-raising the signal at exit (exit 0)."""

    def __new__(cls, config, svc, grace):
        uvicorn = _web_stack()

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                elif not self.should_exit:
                    log.warning("draining: no new requests; running ones get %gs to finish", grace)
                    svc.drain()
                    self.timer = threading.Timer(
                        grace, svc.scheduler.abort_all, ("the server is shutting down",)
                    )
                    self.timer.daemon = True
                    self.timer.start()
                self.should_exit = True

            def cancel_timer(self):
                timer = getattr(self, "timer", None)
                if timer is not None:
                    timer.cancel()

        return Server(config)
