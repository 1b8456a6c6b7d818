"""gateway.http: reading bodies within bounds (BodyReader, InflightBytes,
Deadlines), undoing Content-Encoding (decode_body), the client address behind
trusted proxies (ClientAddress), CORS through the app, and the shutdown drain
(Drain) in front of a real ASGI app."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import httpx
import pytest

from gateway.http import (
    DRAIN_BYTES,
    BadEncoding,
    BodyReader,
    ClientAddress,
    ClientGone,
    Deadlines,
    Drain,
    InflightBytes,
    Overloaded,
    TooLarge,
    content_length,
    decode_body,
    header_dict,
)
from tests.support import gateway, settings_for

pytestmark = pytest.mark.anyio


# -- BodyReader and InflightBytes ----------------------------------------------


def _receiver(*chunks: bytes, disconnect: bool = False) -> tuple[Any, list[int]]:
    """An ASGI receive sending `chunks` as one body (or, with `disconnect`,
    the client leaving after them), and how many times it was called."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": disconnect or n < len(chunks) - 1}
        for n, chunk in enumerate(chunks)
    ]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    calls = [0]

    async def receive() -> dict[str, Any]:
        calls[0] += 1
        return messages.pop(0)

    return receive, calls


def _length(size: int) -> dict[str, str]:
    return {"content-length": str(size)}


async def test_a_body_in_chunks_is_read_whole() -> None:
    receive, calls = _receiver(b"ab", b"", b"cd")
    reader = BodyReader(receive)
    assert await reader.read({}, 4, Deadlines(30)) == b"abcd"
    assert calls == [3] and reader.complete
    await reader.drain()  # nothing left: nothing more asked
    assert calls == [3]


async def test_a_declared_length_over_the_limit_is_refused_before_a_byte_is_read() -> None:
    receive, calls = _receiver(b"x" * 11)
    reader = BodyReader(receive)
    with pytest.raises(TooLarge):
        await reader.read(_length(11), 10, Deadlines(30))
    assert calls == [0] and not reader.complete
    await reader.drain()  # the rest is read and discarded, so the 413 is not overtaken by a reset
    assert calls == [1] and reader.complete


async def test_a_declared_length_past_what_is_worth_draining_is_never_read() -> None:
    receive, calls = _receiver(b"x")
    reader = BodyReader(receive)
    with pytest.raises(TooLarge):
        await reader.read(_length(10 + DRAIN_BYTES + 1), 10, Deadlines(30))
    await reader.drain()
    assert calls == [0] and reader.complete  # answered, then the connection closes


async def test_a_body_without_a_length_is_cut_off_as_it_passes_the_limit() -> None:
    receive, calls = _receiver(b"x" * 6, b"x" * 6, b"x" * 6)
    with pytest.raises(TooLarge):
        await BodyReader(receive).read({}, 10, Deadlines(30))
    assert calls == [2]  # not the third chunk


async def test_a_client_leaving_mid_body_is_client_gone() -> None:
    receive, _ = _receiver(b"{", disconnect=True)
    with pytest.raises(ClientGone):
        await BodyReader(receive).read({}, 10, Deadlines(30))


async def test_the_bytes_in_flight_are_counted_and_given_back() -> None:
    budget = InflightBytes(10)
    declared = BodyReader(_receiver(b"x" * 6)[0], budget)
    assert await declared.read(_length(6), 100, Deadlines(30)) == b"x" * 6
    assert budget.used == 6 and declared.held == 6
    # Declared past what is left: refused before reading, nothing taken.
    receive, calls = _receiver(b"y" * 5)
    over = BodyReader(receive, budget)
    with pytest.raises(Overloaded):
        await over.read(_length(5), 100, Deadlines(30))
    assert calls == [0] and budget.used == 6
    over.release()
    assert budget.used == 6
    # Without a length: counted chunk by chunk as it comes.
    chunked = BodyReader(_receiver(b"z" * 3, b"z" * 3)[0], budget)
    with pytest.raises(Overloaded):
        await chunked.read({}, 100, Deadlines(30))
    assert budget.used == 9
    chunked.release()
    declared.release()
    declared.release()  # once answered, given back once
    assert budget.used == 0
    assert budget.take(10) and not budget.take(1)


async def test_refuse_discards_a_small_body_and_leaves_a_large_one_unread() -> None:
    receive, calls = _receiver(b"a", b"b")
    small = BodyReader(receive)
    await small.refuse(_length(2))
    assert calls == [2] and small.complete
    receive, calls = _receiver(b"a")
    large = BodyReader(receive)
    await large.refuse(_length(DRAIN_BYTES + 1))
    await large.drain()
    assert calls == [0] and large.complete


@pytest.mark.parametrize(("value", "expected"), [
    ("", None), ("12", 12), (" 12 ", 12), ("0", 0), ("-1", None), ("1e3", None), ("12, 12", None),
    ("\u00b2", None), ("\u0663", None), ("9" * 19, 10**18), ("9" * 5000, 10**18),
])
def test_content_length_is_ascii_digits_or_nothing(value: str, expected: int | None) -> None:
    assert content_length({"content-length": value}) == expected
    assert content_length({}) is None


def test_header_dict_lowers_names_and_joins_repeats() -> None:
    scope = {"headers": [(b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"),
                         (b"Content-Type", b"application/json"), (b"X-Latin", b"caf\xe9")]}
    assert header_dict(scope) == {"x-forwarded-for": "1.1.1.1,2.2.2.2", "content-type": "application/json",
                                  "x-latin": "caf\u00e9"}


# -- Deadlines: one timer for every body read in flight ------------------------


def _never() -> object:
    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        raise AssertionError

    return receive



async def test_a_read_past_its_deadline_ends_in_timeout_and_the_task_is_not_left_cancelled() -> None:
    deadlines = Deadlines(0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await BodyReader(_never()).read({}, 1000, deadlines)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.5, elapsed
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation left pending for the next await
    assert deadlines._reads == {} and deadlines._expired == set()



async def test_reads_within_their_deadline_are_untouched_and_leave_nothing_behind() -> None:
    deadlines = Deadlines(1.0)  # the slowest read below takes 0.3 s

    async def slowly(delay: float) -> bytes:
        parts = [{"type": "http.request", "body": b"ab", "more_body": True},
                 {"type": "http.request", "body": b"cd", "more_body": False}]

        async def receive() -> dict[str, object]:
            await asyncio.sleep(delay)
            return parts.pop(0)

        return await BodyReader(receive).read({}, 1000, deadlines)

    assert await asyncio.gather(*(slowly(0.05 * n) for n in range(1, 4))) == [b"abcd"] * 3
    await asyncio.sleep(1.0)  # past where a leftover deadline would have fired
    assert deadlines._reads == {} and deadlines._expired == set()



async def test_a_cancellation_from_elsewhere_is_still_a_cancellation() -> None:
    deadlines = Deadlines(10)
    reader = asyncio.ensure_future(BodyReader(_never()).read({}, 1000, deadlines))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert deadlines._reads == {}



# -- decode_body: Content-Encoding, capped ---------------------------------------------


@pytest.mark.parametrize("encoding", ["", "identity", " Identity "])
def test_an_identity_body_is_the_body(encoding: str) -> None:
    body = b'{"a": 1}'
    assert decode_body(body, encoding, 8) is body


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", " GZip "])
def test_a_gzip_body_is_inflated(encoding: str) -> None:
    assert decode_body(gzip.compress(b"x" * 1000), encoding, 1000) == b"x" * 1000


def test_the_inflated_size_is_capped_too() -> None:
    with pytest.raises(TooLarge):
        decode_body(gzip.compress(b"x" * 1001), "gzip", 1000)
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 KB of gzip
    assert len(bomb) < 128 * 1024
    with pytest.raises(TooLarge):
        decode_body(bomb, "gzip", 1024 * 1024)


@pytest.mark.parametrize(("body", "encoding", "message"), [
    (b"not gzip", "gzip", "corrupt gzip body"),
    (gzip.compress(b"x" * 100)[:-6], "gzip", "corrupt gzip body"),  # truncated
    (gzip.compress(b"x") + b"trailing", "gzip", "corrupt gzip body"),
    (b"", "gzip", "corrupt gzip body"),
    (b"{}", "br", "unsupported Content-Encoding: br"),
    (b"{}", "gzip, gzip", "unsupported Content-Encoding: gzip, gzip"),
    (b"{}", "x" * 100, "unsupported Content-Encoding: " + "x" * 40),
])
def test_other_encodings_and_corrupt_bodies_are_bad_encoding(
    body: bytes, encoding: str, message: str
) -> None:
    with pytest.raises(BadEncoding) as info:
        decode_body(body, encoding, 1000)
    assert str(info.value) == message


# -- ClientAddress: the client behind trusted proxies -----------------------------


def _client(trusted: list[str], peer: str | None, forwarded: str | None = None) -> str:
    scope: dict[str, Any] = {"client": (peer, 50000) if peer is not None else None, "headers": []}
    headers = {} if forwarded is None else {"x-forwarded-for": forwarded}
    return ClientAddress(trusted)(scope, headers)


def test_without_trusted_proxies_the_peer_is_the_client_whatever_it_forwards() -> None:
    assert _client([], "203.0.113.9", "198.51.100.1") == "203.0.113.9"
    assert _client(["10.0.0.0/8"], "203.0.113.9", "198.51.100.1") == "203.0.113.9"  # peer not trusted
    assert _client([], None) == ""


@pytest.mark.parametrize(("forwarded", "client"), [
    # The first address from the right that no trusted proxy added.
    ("198.51.100.1", "198.51.100.1"),
    ("198.51.100.1, 10.0.0.2", "198.51.100.1"),
    # A client's own prefix cannot pick its address: it is left of the real one.
    ("1.2.3.4, 198.51.100.1, 10.0.0.2", "198.51.100.1"),
    ("1.2.3.4,198.51.100.1", "198.51.100.1"),
    (" , 198.51.100.1 ,, ", "198.51.100.1"),
    # Every hop trusted: the leftmost.
    ("10.0.0.3, 10.0.0.2", "10.0.0.3"),
    # Nothing forwarded, or nonsense where the client should be: the peer.
    ("", "10.0.0.1"),
    ("not-an-ip, 10.0.0.2", "10.0.0.1"),
    ("198.51.100.1, 999.1.1.1", "10.0.0.1"),
    # Written the way the address module writes it.
    ("2001:DB8:0:0::0001", "2001:db8::1"),
    ("2001:db8::1, fd00::7", "2001:db8::1"),
])
def test_behind_trusted_proxies_the_forwarded_chain_is_walked_from_the_right(
    forwarded: str, client: str
) -> None:
    assert _client(["10.0.0.0/8", "fd00::/8"], "10.0.0.1", forwarded) == client


def test_a_trusted_ipv6_peer_and_a_single_address_as_a_network() -> None:
    assert _client(["::1", "192.0.2.7"], "::1", "198.51.100.1, 192.0.2.7") == "198.51.100.1"
    assert _client(["::1"], "::2", "198.51.100.1") == "::2"


# -- CORS on the ingestion routes, through the app ------------------------------------

CORS_PATHS = [
    ("/track", {"X-Cohorly-Token": "wrong"}, "x-cohorly-token"),
    ("/api/client/events", {"Authorization": "Bearer wrong"}, "authorization"),
    ("/v1/ingest", {"Authorization": "Bearer wrong"}, "authorization"),
    ("/events/batch", {}, "content-type"),
]


@pytest.mark.parametrize(("path", "credential", "needed"), CORS_PATHS)
async def test_a_preflight_is_204_without_credentials_and_allows_what_the_sdk_sends(
    sqlite_backend: dict[str, str], path: str, credential: dict[str, str], needed: str
) -> None:
    origin = "https://shop.example"
    async with gateway(settings_for(sqlite_backend)) as client:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        reply = await client.options(path, headers=preflight)
        assert reply.status_code == 204 and reply.content == b""
        assert "POST" in reply.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
        assert {"content-type", needed} <= allowed
        assert reply.headers["access-control-allow-origin"] == origin
        assert reply.headers["access-control-allow-credentials"] == "true"
        assert reply.headers["vary"] == "Origin"
        assert int(reply.headers["access-control-max-age"]) > 0
        # The headers a browser asks for are the ones allowed.
        asked = "X-Custom, content-type"
        reply = await client.options(path, headers={**preflight, "Access-Control-Request-Headers": asked})
        assert reply.headers["access-control-allow-headers"] == asked
        # Without an Origin: any.
        reply = await client.options(path)
        assert reply.status_code == 204 and reply.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in reply.headers


@pytest.mark.parametrize(("path", "credential", "needed"), CORS_PATHS)
async def test_every_answer_to_a_request_with_an_origin_echoes_it_errors_included(
    sqlite_backend: dict[str, str], path: str, credential: dict[str, str], needed: str
) -> None:
    origin = "https://blog.example"
    async with gateway(settings_for(sqlite_backend)) as client:
        refused = await client.post(path, content=b"{", headers={**credential, "Origin": origin})
        assert refused.status_code >= 200
        assert refused.headers["access-control-allow-origin"] == origin
        assert refused.headers["access-control-allow-credentials"] == "true"
        assert refused.headers["vary"] == "Origin"
        plain = await client.post(path, content=b"{", headers=credential)
        assert plain.status_code == refused.status_code
        assert not [h for h in plain.headers if h.startswith("access-control-")]


# -- Drain: the shutdown drain -------------------------------------------------


class Gated:
    """Answers 200 once `gate` is set; keeps the request in flight until then."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.entered.set()
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"ok"})



async def test_answers_ask_for_close_only_once_draining() -> None:
    inner = Gated()
    inner.gate.set()
    drain = Drain(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        before = await client.get("/x")
        drain.begin()
        after = await client.get("/x")
    assert before.status_code == after.status_code == 200
    assert before.headers["connection"] == "keep-alive"
    assert after.headers.get_list("connection") == ["close"]



async def test_idle_waits_for_requests_in_flight_and_a_quiet_moment() -> None:
    inner = Gated()
    drain = Drain(inner)
    assert await drain.idle(quiet=0.01, timeout=1) is True  # nothing ever came
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        request = asyncio.ensure_future(client.get("/x"))
        await inner.entered.wait()
        assert drain.in_flight == 1
        assert await drain.idle(quiet=0.01, timeout=0.2) is False  # still in flight
        waiting = asyncio.ensure_future(drain.idle(quiet=0.05, timeout=2))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        inner.gate.set()
        assert (await request).status_code == 200
        assert await waiting is True
    assert drain.in_flight == 0



async def test_a_request_during_the_quiet_moment_restarts_it() -> None:
    inner = Gated()
    inner.gate.set()
    drain = Drain(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.ensure_future(drain.idle(quiet=0.2, timeout=5))
        await asyncio.sleep(0.1)
        assert (await client.get("/x")).status_code == 200  # inside the quiet window
        assert await waiting is True
        # Quiet had to be seen again after that request: more than 0.2 s in all.
        assert loop.time() - started >= 0.25
