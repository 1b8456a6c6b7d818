"""The access log (`[logging] access_log = true`): one line per HTTP
request, once it is answered: method, path, status, duration and peer.

The path is the one the client asked for without its query string (a
query may carry a credential, Collect's `token=` for one), escaped so a
decoded path cannot break the line; the peer is the connection's address.
No header is read: neither a credential nor a cookie can get in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.logs import ACCESS, Line

log = logging.getLogger(ACCESS)
# A longer path is cut (a client chooses it).
MAX_PATH = 512


class StatusNoted:
    """An ASGI `send` that notes the status of the answer it passes on; 500
    while none was started (the server's answer to an app that failed)."""

    __slots__ = ("send", "status")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class AccessLog:
    """Pure ASGI: logs every HTTP request of the wrapped app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._line = Line(log, "request", "method=%s path=%s status=%d duration_ms=%.2f peer=%s")
        # The admin listener's app, as `gateway.app.Dispatch.admin`.
        self.admin: Any = None
        # `gateway.app.Dispatch.reconfigure` of the wrapped app (gateway.reload).
        self.reconfigure: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        noted = StatusNoted(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            status = noted.status
            client = scope.get("client")
            path: str = scope["path"]
            if not path.isascii() or not path.isprintable() or len(path) > MAX_PATH:
                path = path[:MAX_PATH].encode("unicode_escape").decode("ascii")
            self._line(scope["method"], path, status, round((time.perf_counter() - started) * 1000, 2),
                       client[0] if client else "-")
