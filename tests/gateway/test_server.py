"""The server's connection limits, through raw sockets against the gateway's
own server (`gateway.server`) on a loopback port: request headers must be
complete within `server.read_timeout`, at most `server.max_connections` are
served at once per listener, and cleartext HTTP/2 only when `server.h2c` is on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from gateway.config import Settings
from tests.support import free_port, own_server, settings_for


def _settings(sqlite_backend: dict[str, str], **server: Any) -> Settings:
    return settings_for(sqlite_backend, server={"bind": f"127.0.0.1:{free_port()}", **server})


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (None if it did not in time);
    whatever it sent first is read and dropped."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


def _answer(sock: socket.socket, seconds: float) -> bytes:
    """One whole response (headers and a Content-Length body), or what came in time."""
    sock.settimeout(seconds)
    data = b""
    with contextlib.suppress(TimeoutError):
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if len(body) >= (length[0] if length else 0):
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _answers(sock: socket.socket, count: int, seconds: float) -> list[bytes]:
    """The first `count` responses (each with a Content-Length body), or those that came in time."""
    sock.settimeout(seconds)
    data, answers = b"", []
    with contextlib.suppress(TimeoutError):
        while len(answers) < count:
            head, sep, rest = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if sep and length and len(rest) >= length[0]:
                answers.append(head + sep + rest[:length[0]])
                data = rest[length[0]:]
                continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return answers


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def _trickle_until_cut(sock: socket.socket, give_up: float = 12) -> float | None:
    """Send a header byte every 0.5 s (every single read is prompt, the
    headers never end) until the server closes: the seconds that took, or
    None if it never did within `give_up`."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < give_up:
        try:
            sock.sendall(b"X")
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


def test_headers_trickled_byte_by_byte_are_cut_off_at_read_timeout(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, read_timeout=2)) as urls:
        loris = _connect(urls["public"])
        loris.sendall(b"POST /track HTTP/1.1\r\nHost: t\r\n")
        cut = _trickle_until_cut(loris)
        loris.close()
        assert cut is not None, "the slow headers were never cut off"
        assert 1.5 <= cut < 6, cut
        # A prompt client is served meanwhile and after.
        assert httpx.get(urls["public"] + "/healthz", timeout=5).status_code == 200


def test_a_connection_sending_nothing_is_closed_at_read_timeout(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, read_timeout=2)) as urls:
        silent = _connect(urls["public"])
        closed = _closed_within(silent, 10)
        silent.close()
        assert closed is not None and 1.5 <= closed < 6, closed


def test_the_next_request_on_a_kept_alive_connection_has_its_own_header_deadline(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, read_timeout=2)) as urls:
        sock = _connect(urls["public"])
        for _ in range(3):  # requests 1.5 s apart: each is prompt, the connection lives on
            sock.sendall(GET_HEALTHZ)
            assert _answer(sock, 5).startswith(b"HTTP/1.1 200"), "a prompt request was not answered"
            time.sleep(1.5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # then headers that never end
        cut = _trickle_until_cut(sock)
        sock.close()
        assert cut is not None and cut < 6, cut


def test_past_max_connections_a_new_connection_waits_for_a_free_slot(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, read_timeout=20, max_connections=2)) as urls:
        time.sleep(0.5)  # the start-up probe's connection is closed by now
        held = [_connect(urls["public"]) for _ in range(2)]
        for sock in held:  # both served (a request answered on each), then idle
            sock.sendall(GET_HEALTHZ)
            assert _answer(sock, 5).startswith(b"HTTP/1.1 200")
        waiting = _connect(urls["public"])  # the kernel completes the handshake: it sits in the backlog
        waiting.sendall(GET_HEALTHZ)
        assert _answer(waiting, 1.5) == b"", "a third connection was served past max_connections = 2"
        held[0].close()
        started = time.monotonic()
        answer = _answer(waiting, 10)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert time.monotonic() - started < 5
        for sock in (held[1], waiting):
            sock.close()


def test_h2c_off_ignores_the_upgrade_and_refuses_the_http2_preface(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend)) as urls:
        sock = _connect(urls["public"])
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        answer = _answer(sock, 5)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        sock.close()
        prior = _connect(urls["public"])
        prior.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        prior.settimeout(5)
        frame = prior.recv(65536)
        # GOAWAY (type 7) on stream 0 with error code HTTP_1_1_REQUIRED (0xd), then the close.
        assert frame[3] == 7 and frame[-4:] == b"\x00\x00\x00\x0d", frame
        assert _closed_within(prior, 5) is not None
        prior.close()


def test_h2c_on_switches_protocols(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, h2c=True)) as urls:
        sock = _connect(urls["public"])
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        assert _answer(sock, 5).startswith(b"HTTP/1.1 101"), "h2c on: the upgrade was not taken"
        sock.close()


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend)) as urls:
        for _ in range(5):
            sock = _connect(urls["public"])
            sock.sendall(GET_HEALTHZ)
            sock.shutdown(socket.SHUT_WR)  # done sending (as `curl -T` or a load balancer may do)
            answer = _answer(sock, 5)
            sock.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
        sock = _connect(urls["public"])  # two requests, then the half-close
        sock.sendall(GET_HEALTHZ + GET_HEALTHZ)
        sock.shutdown(socket.SHUT_WR)
        answers = _answers(sock, 2, 5)
        closed = _closed_within(sock, 5)
        sock.close()
        assert [a[:12] for a in answers] == [b"HTTP/1.1 200"] * 2, answers
        assert closed is not None, "the connection was not closed after the answers"


def test_pipelined_requests_are_answered_in_order(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend)) as urls:
        sock = _connect(urls["public"])
        sock.sendall(GET_HEALTHZ + b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n" + GET_HEALTHZ)
        answers = _answers(sock, 3, 5)
        sock.close()
        assert [a[:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 404", b"HTTP/1.1 200"], answers


def test_malformed_and_oversized_requests_get_an_error_answer_and_the_server_lives_on(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend)) as urls:
        for request, status in [(b"GARBAGE\r\n\r\n", b"400"),
                                (b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n", b"400"),
                                (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                                 b"431")]:
            sock = _connect(urls["public"])
            sock.sendall(request)
            answer = _answer(sock, 5)
            assert answer.startswith(b"HTTP/1.1 " + status), answer
            assert _closed_within(sock, 5) is not None
            sock.close()
        assert httpx.get(urls["public"] + "/healthz", timeout=5).status_code == 200


def test_expect_100_continue_gets_a_100_then_the_answer(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend)) as urls:
        sock = _connect(urls["public"])
        body = b'{"event":"e","properties":{"distinct_id":"u"}}'
        sock.sendall(b"POST /track HTTP/1.1\r\nHost: t\r\nX-Cohorly-Token: tok_shop\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100"), "no 100 Continue"
        sock.sendall(body)
        answer = _answer(sock, 5)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_connections_reset_in_any_state_give_their_slot_back(sqlite_backend) -> None:
    with own_server(_settings(sqlite_backend, read_timeout=20, max_connections=2)) as urls:
        time.sleep(0.5)  # the start-up probe's connection is closed by now
        for partial in [b"", b"GET /healthz HTTP/1.1\r\nHo", GET_HEALTHZ, b"GARBAGE\r\n\r\n",
                        b"POST /track HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"]:
            for _ in range(2):
                sock = _connect(urls["public"])
                sock.sendall(partial)
                time.sleep(0.05)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()  # RST
        time.sleep(0.5)
        held = [_connect(urls["public"]) for _ in range(2)]
        for sock in held:
            sock.sendall(GET_HEALTHZ)
            assert _answer(sock, 5).startswith(b"HTTP/1.1 200"), "a slot was not given back"
            sock.close()


class _SlowApp:
    """An ASGI app answering /slow after `delay` s and /forever never; it
    notes the lifespan's shutdown and the cancellation of its requests."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.seen.append("lifespan shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        try:
            await asyncio.sleep(self.delay if scope["path"] == "/slow" else 3600)
        except asyncio.CancelledError:
            self.seen.append(f"{scope['path']} cancelled")
            raise
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _serving(app: Any, *, read_timeout: float, graceful_timeout: float) -> Iterator[str]:
    """`app` on the gateway's own server in a thread; stopped on leaving."""
    from gateway import serve as serving
    from gateway.server import Limits, Listener, serve

    bind = f"127.0.0.1:{free_port()}"
    listener = Listener(serving.bind_socket(bind, reuse_port=False), app, "public")
    limits = Limits(read_timeout=read_timeout, max_connections=100, h2c=False)
    config = serving.hypercorn_config(graceful_timeout=graceful_timeout * 2)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(serve(app, [listener], config, limits, stop.wait)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:  # listening yet?
        try:
            _connect(f"http://{bind}").close()
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    try:
        yield f"http://{bind}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop"
        loop.close()


def test_an_answer_that_takes_longer_than_read_timeout_is_still_sent() -> None:
    # read_timeout bounds the client's reads; a client waiting for its
    # answer sends nothing and is not a slow client.
    with _serving(_SlowApp(delay=2.5), read_timeout=1, graceful_timeout=1) as url:
        sock = _connect(url)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = _answer(sock, 6)
        # No more reads once one timed out: closed after the answer, not
        # kept for keep_alive_timeout.
        closed = _closed_within(sock, 3)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert closed is not None, "the connection was kept open after its answer"


def test_requests_still_running_after_the_graceful_timeout_are_cancelled_before_the_lifespan_ends() -> None:
    app = _SlowApp(delay=0)
    with _serving(app, read_timeout=30, graceful_timeout=1) as url:
        sock = _connect(url)
        sock.sendall(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
    sock.close()
    assert app.seen == ["/forever cancelled", "lifespan shutdown"]
