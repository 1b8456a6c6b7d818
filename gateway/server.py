"""The HTTP server of one process: its listening sockets, its connections and
their limits, on hypercorn's HTTP/1.1 and HTTP/2 protocol code.

hypercorn's own `serve` accepts every connection it is offered and times
out each read on its own, so a client sending a header byte every few
seconds holds a connection for ever and nothing bounds how many are open.
This accept loop and connection keep hypercorn's protocols and add:

- a connection cap per listener: with `max_connections` open, the listener
  stops accepting; new connections wait in the kernel's listen backlog
  (`BACKLOG`; past it the kernel drops their SYNs and clients resend them)
  and are taken in order as open ones close;
- a header deadline: a request's headers must be complete within
  `read_timeout` (the first request's from the moment the connection is
  accepted, later ones' from their first byte), else the connection is
  closed; every single read is bounded by `read_timeout` too, so an idle
  keep-alive connection is closed after it;
- an HTTP/2 switch: with `h2c` off an `Upgrade: h2c` header is ignored (the
  request is answered in HTTP/1.1) and the prior-knowledge preface is
  answered with GOAWAY HTTP_1_1_REQUIRED and a close;
- several listeners, each serving its own ASGI app (the admin listener), one
  lifespan for all;
- TLS on a listener with a certificate (`gateway.tls`): the handshake is
  part of the first request's header deadline (and bounded by
  `read_timeout` itself), a connection waiting for it holds its slot of
  `max_connections` like any other, and ALPN picks HTTP/2 (offered only
  with `h2c` on) or HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ssl import SSLError
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.worker_context import AsyncioSingleTask, WorkerContext
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

from gateway.tls import Certificate

log = logging.getLogger("dialgate")

# Connections the kernel holds for a listener that is not accepting (at its
# cap, or busy); Linux caps it at net.core.somaxconn.
BACKLOG = 1024
MAX_READ = 65536
# An HTTP/2 GOAWAY frame (stream 0, last stream 0) with error HTTP_1_1_REQUIRED.
_GOAWAY_HTTP_1_1_REQUIRED = bytes.fromhex("000008070000000000") + bytes.fromhex("000000000000000d")


@dataclass(frozen=True)
class Limits:
    read_timeout: float
    max_connections: int
    h2c: bool


@dataclass(frozen=True)
class Listener:
    """A bound socket (not yet listening) and the ASGI app it serves."""

    sock: socket.socket
    app: Any
    name: str
    tls: Certificate | None = None


async def serve(lifespan_app: Any, listeners: Sequence[Listener], config: Any, limits: Limits,
                shutdown_trigger: Callable[[], Awaitable[None]]) -> None:
    """Run `lifespan_app`'s lifespan, serve every listener until
    `shutdown_trigger` returns, then stop accepting, close idle connections,
    give busy ones `config.graceful_timeout`, and shut the lifespan down."""
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {}
    lifespan = Lifespan(ASGIWrapper(lifespan_app), config, loop, state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan())
    await lifespan.wait_for_startup()
    if lifespan_task.done() and (failure := lifespan_task.exception()) is not None:
        raise failure
    context = WorkerContext(None)
    connections: set[asyncio.Task[None]] = set()
    accepting = [
        loop.create_task(_accept(listener, ASGIWrapper(listener.app), config, context, state, limits,
                                 connections))
        for listener in listeners
    ]
    try:
        await shutdown_trigger()
    finally:
        for task in accepting:
            task.cancel()
        await asyncio.gather(*accepting, return_exceptions=True)
        for listener in listeners:
            listener.sock.close()
        # Idle connections close at once; busy ones once their answer is out.
        await context.terminated.set()
        if connections:
            _, late = await asyncio.wait(set(connections), timeout=config.graceful_timeout)
            # Past the graceful timeout, requests are cancelled before the
            # lifespan shuts down what they use (as hypercorn's serve does).
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await lifespan.wait_for_shutdown()
        lifespan_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lifespan_task


async def _accept(listener: Listener, app: Any, config: Any, context: WorkerContext, state: dict[str, Any],
                  limits: Limits, connections: set[asyncio.Task[None]]) -> None:
    loop = asyncio.get_running_loop()
    sock = listener.sock
    sock.setblocking(False)
    sock.listen(BACKLOG)
    slots = asyncio.Semaphore(limits.max_connections)
    warned = _Once(60.0)

    def closed(task: asyncio.Task[None]) -> None:
        connections.discard(task)
        slots.release()

    while True:
        if slots.locked() and warned.now():
            log.warning("listener %s: %d connections open (server.max_connections); new ones wait in the "
                        "backlog", listener.name, limits.max_connections)
        await slots.acquire()
        try:
            conn, _ = await loop.sock_accept(sock)
        except OSError as exc:
            # Out of file descriptors, or a connection reset while queued.
            slots.release()
            if warned.now():
                log.warning("listener %s: accept failed: %s", listener.name, exc)
            await asyncio.sleep(0.1)
            continue
        # Small answers go out at once: with Nagle, a body written after its
        # headers waits for the client's delayed ACK (about 40 ms a request).
        # (asyncio sets this only on sockets made with proto IPPROTO_TCP.)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(_connection(conn, app, config, context, state, limits, listener.tls))
        connections.add(task)
        task.add_done_callback(closed)


async def _connection(conn: socket.socket, app: Any, config: Any, context: WorkerContext,
                      state: dict[str, Any], limits: Limits, tls: Certificate | None) -> None:
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    reader = asyncio.StreamReader(limit=MAX_READ, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        if tls is None:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        else:
            # The context of now: a reload swaps in a new one for the next
            # handshakes. A client silent during the handshake or the close
            # is cut off like any silent one.
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=tls.context, ssl_handshake_timeout=limits.read_timeout,
                ssl_shutdown_timeout=limits.read_timeout)
    except OSError:  # a reset, or a handshake failed or timed out
        conn.close()
        return
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    await Connection(app, config, context, state, limits, reader, writer, accepted).run()


class _RefusedH2(Exception):
    pass


class _H11Only(H11Protocol):
    """HTTP/1.1 that never switches to HTTP/2 (`server.h2c` off)."""

    async def _check_protocol(self, event: Any) -> None:
        if event.method == b"PRI" and event.target == b"*":
            raise _RefusedH2
        # An `Upgrade: h2c` is ignored: the request is answered in HTTP/1.1.


class Connection:
    """One client connection: reads fed to the protocol, its events written
    back, and the header deadline and idle timeout kept."""

    def __init__(self, app: Any, config: Any, context: WorkerContext, state: dict[str, Any], limits: Limits,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: float | None = None) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.limits = limits
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.send_lock = asyncio.Lock()
        self.idle_task = AsyncioSingleTask()
        self.protocol: Any = None
        # When the headers being received must be complete (None: no request
        # is being received, or one is being answered).
        # (The first request's from the accept: the TLS handshake counts.)
        started = self.loop.time() if accepted is None else accepted
        self.deadline: float | None = started + limits.read_timeout
        self.busy = False
        self.reading = True

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            ssl_object = self.writer.get_extra_info("ssl_object")
            # ALPN offers h2 only with h2c on; no ALPN at all is HTTP/1.1.
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            async with TaskGroup(self.loop) as task_group:
                self.task_group = task_group
                args = (self.app, self.config, self.context, task_group, ConnectionState(self.state),
                        ssl_object is not None, client, server, self.on_event)
                if self.limits.h2c:
                    self.protocol = ProtocolWrapper(*args, alpn_protocol=alpn)
                else:
                    self.protocol = _H11Only(*args)
                await self.protocol.initiate()
                await self.idle_task.restart(task_group, self.idle_timeout)
                await self.read()
        except OSError:
            pass
        finally:
            await self.close()

    async def read(self) -> None:
        read_timeout = self.limits.read_timeout
        while not self.reader.at_eof():
            timeout = read_timeout
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - self.loop.time())
                if timeout <= 0:
                    break  # headers not complete in time: a slow (or loris) client
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_READ), timeout)
            except (ConnectionError, OSError, TimeoutError, SSLError):
                break
            if data and self.deadline is None and not self.busy:
                # The first bytes of the next request: its headers are due.
                self.deadline = self.loop.time() + read_timeout
            try:
                await self.protocol.handle(RawData(data))
            except _RefusedH2:
                await self.write(_GOAWAY_HTTP_1_1_REQUIRED)
                break
        self.reading = False
        await self.protocol.handle(Closed())
        if not self.busy:
            # Closed now, not when the idle timer would have run out. A
            # request being answered (the client half-closed, or waits
            # longer than read_timeout) gets its answer first: the
            # connection closes once it is out (`on_event`).
            await self.close()

    async def on_event(self, event: Event) -> None:
        if isinstance(event, RawData):
            await self.write(event.data)
        elif isinstance(event, Closed):
            await self.close()
        elif isinstance(event, Updated):
            if event.idle:
                self.busy = False
                if not self.reading:
                    await self.close()
                    return
                await self.idle_task.restart(self.task_group, self.idle_timeout)
            else:
                # A request's headers are complete; its body has the app's
                # own deadline.
                self.busy = True
                self.deadline = None
                await self.idle_task.stop()

    async def write(self, data: bytes) -> None:
        async with self.send_lock:
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                await self.protocol.handle(Closed())

    async def idle_timeout(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.context.terminated.wait(), self.config.keep_alive_timeout)
        await asyncio.shield(self.close_from_server())

    async def close_from_server(self) -> None:
        await self.protocol.handle(Closed())
        self.writer.close()

    async def close(self) -> None:
        with contextlib.suppress(NotImplementedError, OSError, RuntimeError):
            self.writer.write_eof()
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (BrokenPipeError, ConnectionAbortedError, ConnectionResetError, RuntimeError,
                asyncio.CancelledError):
            pass
        finally:
            await self.idle_task.stop()


class _Once:
    """True at most once every `seconds` (for warnings a flood would repeat)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -seconds

    def now(self) -> bool:
        current = time.monotonic()
        if current - self._last < self.seconds:
            return False
        self._last = current
        return True
