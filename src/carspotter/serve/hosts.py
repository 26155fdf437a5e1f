"""A Host-header allow-list, so that a DNS-rebinding web page cannot read the API from a user's browser.

A page on evil.example can make its own name resolve to 127.0.0.1 and then fetch this service as a
"same-origin" request; the browser still sends `Host: evil.example`, which is what this refuses.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """'Example.com:8000' → 'example.com'; '[::1]:8000' → '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def allowed_hosts_for(bind: str, extra: list[str] | None = None) -> list[str]:
    """The default list plus the bind address (unless it is a wildcard) and any names given."""
    hosts = list(DEFAULT_HOSTS)
    if bind not in ("0.0.0.0", "::", ""):
        hosts.append(host_name(bind) if not bind.startswith("[") else bind.strip("[]"))
    hosts += [host_name(h) for h in extra or []]
    return list(dict.fromkeys(h.lower() for h in hosts))


class HostAllowListMiddleware:
    """Answer 400 (JSON) to any HTTP request whose Host header is not one of `allowed` ("*" allows all)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(raw) in self.allowed:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "host not allowed; start the server with --allow-host NAME"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
