"""A TCP proxy on loopback that a test cuts and restores, in a thread of its own.

Cut: every connection through it is reset (both sides) and the listening
socket is closed, so new connections are refused, as when the network to
the database goes away or the server's host is gone. Restore: it listens
again on the same port and forwards as before.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.Transport] = set()
        self.accepted = 0
        # mute_after: once a client sends bytes containing this, the
        # server's replies on that connection are dropped (the statement
        # runs, its answer never arrives: a connection lost in flight).
        self.mute_after: bytes | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def cut(self) -> None:
        self._call(self._cut())

    def reset(self) -> None:
        """Reset every connection through it (both sides); new ones are taken."""
        self._call(self._reset())

    async def _reset(self) -> None:
        for transport in list(self._links):
            transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._links):
            transport.abort()
        self._links.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        pair = (client_w.transport, server_w.transport)
        self._links.update(pair)  # type: ignore[arg-type]
        muted: list[bool] = [False]
        try:
            await asyncio.gather(self._pipe(client_r, server_w, self, muted, watch=True),
                                 self._pipe(server_r, client_w, self, muted))
        finally:
            for transport in pair:
                self._links.discard(transport)  # type: ignore[arg-type]
                transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: TcpProxy,
                    muted: list[bool], *, watch: bool = False) -> None:
        try:
            while data := await reader.read(65536):
                if watch and proxy.mute_after is not None and proxy.mute_after in data:
                    muted[0] = True
                elif not watch and muted[0]:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
