"""The server's edge against requests a browser can be made to send: a Host allow-list (DNS rebinding),
JSON-only request bodies (cross-site form posts), and text that cannot be encoded (lone surrogates).

A web page the operator visits can make the browser POST to any address it can reach, but only with a
form content type (text/plain, urlencoded, multipart) unless the server answers a CORS preflight, and
DNS rebinding sends the attacker's own name as the Host. So a server without an API key answers only
requests that name it by a loopback name, the address it is bound to, or a name the operator allowed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from .protocol import APIError, bad

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
JSON_TYPES = ("application/json",)


def host_name(header: str) -> str:
    """The name in a Host header, without its port or a final dot, lower-cased ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal
        return header[1:].partition("]")[0]
    if header.count(":") > 1:  # a bare IPv6 address (a bind address, not a Host header)
        return header
    name, _, port = header.rpartition(":")
    return (name if name and port.isdigit() else header).rstrip(".")


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard_bind(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


class HostPolicy:
    """Which Host names a keyless server answers: loopback names, plus `allowed` ('*' allows any; a leading
    '*.' allows a domain's subdomains)."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allowed = {host_name(a) if a.strip() != "*" else "*" for a in allowed if a and a.strip()}

    def allows(self, name: str) -> bool:
        if "*" in self.allowed or is_loopback(name) or name in self.allowed:
            return True
        return any(a.startswith("*.") and name.endswith(a[1:]) for a in self.allowed)


class HostGuard:
    """ASGI middleware: a keyless server refuses (400, OpenAI-style) requests whose Host it does not know."""

    def __init__(self, app, policy: HostPolicy, enabled: bool = True):
        self.app, self.policy, self.enabled = app, policy, enabled

    async def __call__(self, scope, receive, send):
        if self.enabled and scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"host", b"").decode("latin-1")
            name = host_name(raw)
            if not raw or not self.policy.allows(name):
                from starlette.responses import JSONResponse

                what = f"Host {raw!r}" if raw else "a request without a Host header"
                e = bad(
                    f"{what} is not allowed: this server has no API key and answers only its own "
                    "address and loopback names (start it with --allowed-host NAME or an API key)",
                    code="host_not_allowed",
                )
                await JSONResponse(e.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json_content_type(content_type: str | None) -> None:
    """Bodies are JSON only: a form post from another site (text/plain and the like) is refused (415)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media not in JSON_TYPES:
        got = f"got {media!r}" if media else "none was given"
        raise APIError(
            415,
            f"the request body must be sent as Content-Type: application/json ({got})",
            code="unsupported_media_type",
        )


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "body"


def unencodable(body: Any) -> tuple[str, str] | None:
    """(field path, problem) for the first string in a parsed JSON body that is not valid Unicode (a lone
    surrogate such as "\\ud800", which JSON escapes allow), else None."""
    stack: list[tuple[Any, list[str | int]]] = [(body, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                bad_char = value[e.start]
                return _path(path), f"a lone surrogate ({json.dumps(bad_char)}) at character {e.start}"
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                if unencodable(k) is not None:
                    return _path(path), f"a key that is not valid Unicode ({json.dumps(k)})"
                stack.append((v, [*path, k]))
        elif isinstance(value, list):
            stack.extend((v, [*path, i]) for i, v in reversed(list(enumerate(value))))
    return None


def check_encodable(body: Any) -> None:
    """A 400 naming the field whose text cannot be encoded (rather than a 500 from the tokenizer)."""
    found = unencodable(body)
    if found is not None:
        field, problem = found
        raise bad(f"'{field}' is not valid Unicode text: it holds {problem}", field, "invalid_text")
