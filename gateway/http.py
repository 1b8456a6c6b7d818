"""HTTP plumbing shared by every dialect: bodies, encodings, client address,
CORS, and the shutdown drain (a plain ASGI middleware). Trailing slashes are
the router's (gateway.app.Dispatch)."""

from __future__ import annotations

import asyncio
import ipaddress
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Scope = dict[str, Any]

# Before answering 413, read and discard up to this much of the rest of the
# body, so the client sees the answer instead of a connection reset.
DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 5.0


class TooLarge(Exception):
    pass


class BadEncoding(Exception):
    pass


class ClientGone(Exception):
    pass


class Overloaded(Exception):
    """The worker holds as many request body bytes as it may (503)."""


class InflightBytes:
    """The request body bytes one worker holds at once, bounded: a body is
    counted from its declared Content-Length before any of it is read (or
    chunk by chunk as it comes, when it declares none) until its request is
    answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


def content_length(headers: Mapping[str, str]) -> int | None:
    """The declared Content-Length; None when absent or not a number (ASCII
    digits only: "²" is a digit to str.isdigit, and int() refuses it)."""
    declared = headers.get("content-length", "").strip()
    if not declared or not declared.isascii() or not declared.isdigit():
        return None
    # Past 18 digits it is more than any limit: no need for int() to read
    # thousands of them (it refuses more than 4,300).
    return int(declared) if len(declared) <= 18 else 10**18


def header_dict(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


class Deadlines:
    """Whole-body deadlines, watched by one timer for every request in
    flight rather than a timer each (what `asyncio.timeout` arms and
    cancels costs a small request a noticeable part of its handling). A
    read is cut off between `seconds` and `seconds` plus a tenth of them
    (at most a second) late."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tick = min(1.0, seconds / 10)
        self._reads: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._reads[task] = loop.time() + self.seconds
        if self._timer is None or loop is not self._loop:  # (a new loop: tests)
            self._loop = loop
            self._timer = loop.call_later(self._tick, self._sweep)
        return task

    def cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether the cancellation `task` got was its deadline's (taken back
        if so: the read ends in TimeoutError instead)."""
        if task in self._expired:
            task.uncancel()
            return True
        return False

    def stop(self, task: asyncio.Task[Any]) -> None:
        del self._reads[task]
        self._expired.discard(task)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._reads.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._tick, self._sweep) if self._reads else None


class BodyReader:
    """Reads a request body, refusing it as soon as it passes `limit`, or
    (TimeoutError) when it has not all come within the `deadlines`."""

    def __init__(self, receive: Any, budget: InflightBytes | None = None) -> None:
        self._receive = receive
        self._budget = budget
        self.held = 0  # bytes counted against the budget (see `release`)
        self.complete = False

    async def read(self, headers: Mapping[str, str], limit: int, deadlines: Deadlines) -> bytes:
        """The body; TooLarge past `limit`, Overloaded past the worker's
        budget of bytes in flight (before reading, for a declared length)."""
        declared = content_length(headers)
        if declared is not None and declared > limit:
            if declared > limit + DRAIN_BYTES:
                self.complete = True  # too much to drain: answer and close
            raise TooLarge
        if declared:
            self._hold(declared)
        chunks: list[bytes] = []
        size = 0
        task = deadlines.start()
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise TooLarge
                if size > self.held:
                    self._hold(size - self.held)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    self.complete = True
                    return b"".join(chunks)
        except asyncio.CancelledError:
            if deadlines.cut(task):
                raise TimeoutError from None
            raise
        finally:
            deadlines.stop(task)

    def _hold(self, size: int) -> None:
        if self._budget is not None and not self._budget.take(size):
            raise Overloaded
        self.held += size

    def release(self) -> None:
        """Give the body's bytes back to the worker's budget (once answered)."""
        if self._budget is not None and self.held:
            self._budget.give(self.held)
        self.held = 0

    async def refuse(self, headers: Mapping[str, str]) -> None:
        """For a request refused before its body was read: discard the body
        (as `drain`) so the answer is not overtaken by a reset, unless it
        declares more than is worth draining (then answer and close)."""
        declared = content_length(headers)
        if declared is not None and declared > DRAIN_BYTES:
            self.complete = True
            return
        await self.drain()

    async def drain(self) -> None:
        """Discard what the client is still sending, within bounds."""
        if self.complete:
            return
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                drained = 0
                while drained < DRAIN_BYTES:
                    message = await self._receive()
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        break
                    drained += len(message.get("body", b""))
        except TimeoutError:
            pass
        self.complete = True


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding; the decoded size is capped at `limit` too."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise BadEncoding(f"unsupported Content-Encoding: {encoding[:40]}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadEncoding("corrupt gzip body") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge
    if not inflater.eof or inflater.unused_data:
        raise BadEncoding("corrupt gzip body")
    return out


class ClientAddress:
    """The client IP: the peer, or X-Forwarded-For when the peer is trusted.

    The forwarded chain is walked from the right, skipping trusted proxies;
    the first address not trusted is the client.
    """

    def __init__(self, trusted: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in trusted]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def __call__(self, scope: Scope, headers: dict[str, str]) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not self._networks or not self._trusted(peer):
            return peer
        forwarded = headers.get("x-forwarded-for", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer
        return hops[0] if hops else peer


def _header(scope: Scope, name: bytes) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]  # the ASGI spec's type
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class Cors:
    """CORS for the ingestion routes, as browser SDKs need it: preflights
    get 204 without credentials being checked; every response to a request
    with an Origin, errors included, echoes it and allows credentials. The
    route's handler calls these itself (a middleware around it would cost
    every request a coroutine and a wrapped `send`)."""

    ALLOW_METHODS = b"GET, POST, OPTIONS"
    # Allowed when a preflight names none, with the headers the dialects
    # declare (`Dialect.cors_headers`, see `allow_headers`).
    DEFAULT_HEADERS = ("Content-Type", "Content-Encoding", "Authorization")

    @classmethod
    def allow_headers(cls, extra: Iterable[str]) -> bytes:
        """The preflight's default `Access-Control-Allow-Headers`."""
        names = list(cls.DEFAULT_HEADERS)
        for name in extra:
            if name.lower() not in {n.lower() for n in names}:
                names.append(name)
        return ", ".join(names).encode("latin-1")

    @classmethod
    async def preflight(cls, scope: Scope, send: Any, allow_headers: bytes) -> None:
        requested = _header(scope, b"access-control-request-headers")
        headers = [
            (b"access-control-allow-methods", cls.ALLOW_METHODS),
            (b"access-control-allow-headers", requested or allow_headers),
            (b"access-control-max-age", b"86400"),
            *cls._origin_headers(_header(scope, b"origin")),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    @classmethod
    def headers(cls, origin: str | None) -> list[tuple[bytes, bytes]]:
        """What an answer to a request with this Origin header (as
        `header_dict` has it) adds: nothing without one."""
        return [] if origin is None else cls._origin_headers(origin.encode("latin-1"))

    @staticmethod
    def _origin_headers(origin: bytes | None) -> list[tuple[bytes, bytes]]:
        if origin is None:
            return [(b"access-control-allow-origin", b"*")]
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]


class Drain:
    """Counts requests in flight and, once `begin()` is called on shutdown,
    asks every client to close its connection after the current answer.

    The server is told to stop only after the gateway has been idle for a
    moment (see `idle`), so a request a client sent just before the signal
    is read, committed and answered rather than cut off mid-way."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = 0
        self.started = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        self.started += 1
        self._idle.clear()
        try:
            if self.draining:
                await self.app(scope, receive, self._closing(send))
            else:
                await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _closing(self, send: Any) -> Any:
        async def send_closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        return send_closing

    def begin(self) -> None:
        self.draining = True

    # The deadline also bounds the quiet wait after the last request, so it is a
    # parameter rather than a cancel scope around the call.
    async def idle(self, *, quiet: float, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until no request has been in flight for `quiet` seconds, for
        at most `timeout` seconds. True when the gateway went quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                return False
            seen = self.started
            await asyncio.sleep(min(quiet, max(0.0, deadline - loop.time())))
            if self.in_flight == 0 and self.started == seen:
                return True
