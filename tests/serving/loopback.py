"""A server on loopback for the serve tests: the app under uvicorn on a thread, on a free port."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.scheduler.close()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        import json

        return json.loads(self.content)


def http(
    method: str, url: str, json=None, headers=None, body: bytes | None = None, timeout: float = 60
) -> Reply:
    """One request with the standard library (raw bytes allowed, for hostile payloads)."""
    import http.client
    import json as jsonlib
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        headers = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, parts.path or "/", body=body, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def sse_lines(url: str, json, headers=None, timeout: float = 60):
    """POST and yield the response's lines as they arrive (the connection closes when the caller stops)."""
    import http.client
    import json as jsonlib
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(
            "POST",
            parts.path,
            body=jsonlib.dumps(json).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        r = conn.getresponse()
        yield r.status
        for line in r:
            yield line.decode().rstrip("\r\n")
    finally:
        conn.close()
