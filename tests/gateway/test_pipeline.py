"""gateway.pipeline: the order of the stages, seen from outside, through the
ASGI app on real backends (SQLite; PostgreSQL with Redis).

Requests go straight to the app with a `receive` that counts the body
messages the gateway asks for, so "refused before the body is read" is
something a test can see: a body declared larger than is worth draining is
answered without one message asked. What is stored is read back through the
admin API, or changed behind the gateway's back in the database itself to
tell the dedup cache's answer from the database's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from gateway.app import build_app
from gateway.config import Settings
from gateway.dedup import Dedup
from gateway.http import DRAIN_BYTES
from gateway.redislink import RedisLink
from tests.support import events_of, gateway, lifespan, settings_for

pytestmark = pytest.mark.anyio

TS = "2026-02-16T10:30:00.000Z"
INSLYTIC = {"authorization": "Bearer ins_shop"}
CLIENT = {"authorization": "Bearer pk_shop"}
COHORLY = {"x-cohorly-token": "tok_shop"}
# No dialect's own window in the way of the stages under test.
UNLIMITED = {"cohorly": {"rate_limit": {"requests": 1_000_000, "per_seconds": 1}},
             "inslytic": {"events_per_minute": 1_000_000}}
# More than any endpoint below takes, and more than is worth draining.
UNREAD = str(1024 + DRAIN_BYTES + 1)


class Answer(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    body: bytes
    pulled: int  # body messages the gateway asked for

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: Any, path: str, headers: dict[str, str], body: bytes | list[bytes] = b"", *,
               method: str = "POST", ip: str = "198.51.100.1", length: str | None = None) -> Answer:
    """One request, straight to the ASGI app; `length` overrides the
    declared Content-Length (by default the body's)."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    declared = str(sum(map(len, chunks))) if length is None else length
    raw = [(k.encode(), v.encode()) for k, v in {**headers, "content-length": declared}.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": raw, "client": (ip, 50000), "server": ("gateway", 80)}
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *rest = sent
    return Answer(status=start["status"], headers={k.decode(): v.decode() for k, v in start["headers"]},
                  body=b"".join(m.get("body", b"") for m in rest), pulled=pulled)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its resources started, and an HTTP client for its admin API."""
    app = build_app(settings)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


def inslytic(*names: str, **fields: Any) -> bytes:
    events = [{"eventName": n, "timestamp": TS, "anonymousId": "anon-1", "sessionId": "s",
               "consentGiven": True, **fields} for n in names]
    return json.dumps({"events": events}).encode()


def tracked(*events: tuple[str, str | None]) -> bytes:
    """A Cohorly /track batch of (name, insert id) events."""
    return json.dumps([{"event": name, "properties": {"distinct_id": "u", **({"$insert_id": i} if i else {})}}
                       for name, i in events]).encode()


async def names(client: httpx.AsyncClient, project: str = "shop") -> list[str]:
    return [e["name"] for e in await events_of(client, project)]


# -- 1. the client's windows, then a header credential, then the body ------------------


async def test_over_the_per_ip_limit_the_answer_is_429_whatever_the_credentials_or_body(
    backend: dict[str, str],
) -> None:
    settings = settings_for(backend, limits={"per_ip": {"requests": 1, "per_seconds": 3600}},
                            dialects={**UNLIMITED, "inslytic": {"events_per_minute": 1_000_000,
                                                                "max_body_bytes": 1024}})
    async with running(settings) as (app, client):
        assert (await call(app, "/v1/ingest", INSLYTIC, inslytic("first"))).status == 202
        gz = {**INSLYTIC, "content-encoding": "gzip"}
        refused = [
            await call(app, "/v1/ingest", {"authorization": "Bearer nope"}, b"{}"),  # else 401
            await call(app, "/v1/ingest", gz, b"not gzip"),  # else 400
            await call(app, "/v1/ingest", INSLYTIC, b'{"events": ['),  # else 400
            await call(app, "/v1/ingest", INSLYTIC, b" " * 2048),  # else 413
            await call(app, "/v1/ingest", INSLYTIC, inslytic("valid")),  # else 202
        ]
        assert [a.status for a in refused] == [429] * 5, [a.body for a in refused]
        assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
        # Refused for its credential and its window: its body is never read.
        unread = await call(app, "/v1/ingest", {"authorization": "Bearer nope"}, b"{}", length=UNREAD)
        assert (unread.status, unread.pulled) == (429, 0)
        # Another client has its own window.
        assert (await call(app, "/v1/ingest", INSLYTIC, inslytic("other"), ip="198.51.100.2")).status == 202
        assert await names(client) == ["first", "other"]


@pytest.mark.parametrize(("path", "valid"), [
    ("/v1/ingest", inslytic("e")),
    ("/api/client/events", json.dumps([{"name": "e", "external_id": "p"}]).encode()),
])
async def test_an_unknown_header_credential_is_refused_before_the_body(
    backend: dict[str, str], path: str, valid: bytes
) -> None:
    async with running(settings_for(backend, dialects=UNLIMITED)) as (app, client):
        for credential in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic ins_shop"}):
            # Not inflated: a corrupt gzip body is no 400 ...
            corrupt = await call(app, path, {**credential, "content-encoding": "gzip"}, b"not gzip")
            assert corrupt.status == 401, corrupt.body
            # ... nor is a body over the endpoint's cap a 413 ...
            huge = await call(app, path, credential, [b" " * 65536] * 20)
            assert huge.status == 401, huge.body
            # ... and one declared past what is worth draining is never asked for.
            unread = await call(app, path, credential, valid, length=UNREAD)
            assert (unread.status, unread.pulled) == (401, 0)
        # With the project's key the same corrupt body is read, and refused for what it is.
        good = INSLYTIC if path == "/v1/ingest" else CLIENT
        assert (await call(app, path, {**good, "content-encoding": "gzip"}, b"not gzip")).status == 400
        assert (await call(app, path, good, valid)).status in (202, 204)
        assert await names(client) == ["e"]


# -- 2. the body: capped as read, then inflated under the same cap ----------------------


async def test_the_body_is_capped_before_it_is_decoded(backend: dict[str, str]) -> None:
    settings = settings_for(backend, dialects={**UNLIMITED, "client": {"max_body_bytes": 1024}})
    gz = {**CLIENT, "content-encoding": "gzip"}
    async with running(settings) as (app, client):
        # Over the cap raw: 413 though it would not even inflate.
        assert (await call(app, "/api/client/events", gz, b"\x00" * 1025)).status == 413
        # Over the cap as it comes, without a length: the same.
        chunked = await call(app, "/api/client/events", gz, [b"\x00" * 600, b"\x00" * 600], length="")
        assert chunked.status == 413
        # Declared far over it: answered unread.
        unread = await call(app, "/api/client/events", gz, b"\x00", length=UNREAD)
        assert (unread.status, unread.pulled) == (413, 0)
        # Under the cap compressed, over it inflated.
        padded = json.dumps([{"name": "big", "external_id": "p", "data": {"pad": " " * 1100}}]).encode()
        assert len(gzip.compress(padded)) < 1024
        assert (await call(app, "/api/client/events", gz, gzip.compress(padded))).status == 413
        small = json.dumps([{"name": "small", "external_id": "p"}]).encode()
        assert (await call(app, "/api/client/events", gz, gzip.compress(small))).status == 204
        assert await names(client) == ["small"]


# -- 3b. the per-project limit: costed by a translated batch ---------------------------


async def test_refused_and_invalid_requests_cost_no_project_tokens(backend: dict[str, str]) -> None:
    settings = settings_for(backend, limits={"per_ip": {"requests": 1, "per_seconds": 3600}},
                            dialects={"inslytic": {"events_per_minute": 3, "max_body_bytes": 1024}})
    gz = {**INSLYTIC, "content-encoding": "gzip"}
    async with running(settings) as (app, client):
        # Each from a client of its own, so only the last is over its window.
        three, stale = inslytic("a", "b", "c"), inslytic("a", "b", "c", timestamp="yesterday")
        refusals = [
            await call(app, "/v1/ingest", {"authorization": "Bearer nope"}, three, ip="10.9.0.1"),
            await call(app, "/v1/ingest", INSLYTIC, three, ip="10.9.0.1"),  # over its window
            await call(app, "/v1/ingest", INSLYTIC, b" " * 2000, ip="10.9.0.2"),
            await call(app, "/v1/ingest", gz, b"not gzip", ip="10.9.0.3"),
            await call(app, "/v1/ingest", INSLYTIC, stale, ip="10.9.0.4"),
        ]
        assert [a.status for a in refusals] == [401, 429, 413, 400, 400]
        # The project's 3 tokens are all there ...
        assert (await call(app, "/v1/ingest", INSLYTIC, inslytic("x", "y", "z"), ip="10.9.0.5")).status == 202
        # ... and then gone: this 429 is the project's, the client is new.
        spent = await call(app, "/v1/ingest", INSLYTIC, inslytic("over"), ip="10.9.0.6")
        assert spent.status == 429 and int(spent.headers["retry-after"]) >= 1
        assert await names(client) == ["x", "y", "z"]


# -- 4.-6. dedup through the cache, a 2xx only after the commit --------------------------


async def _forget_stored_events(backend: dict[str, str]) -> None:
    """Empty the events table behind the gateway's back."""
    url = backend["storage_url"]
    if backend["name"] == "sqlite":
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///"))) as db:
            db.execute("DELETE FROM events")
            db.commit()
        return
    import asyncpg

    conn = await asyncpg.connect("postgresql://" + url.removeprefix("postgresql+asyncpg://"))
    try:
        await conn.execute("DELETE FROM events")
    finally:
        await conn.close()


async def _cached(settings: Settings, keys: list[tuple[str, str, str]]) -> None:
    """Wait until Redis's cache knows `keys` (a remember is not waited for)."""
    link = RedisLink(settings.redis.url, prefix=settings.redis.key_prefix, retry_interval=1)
    dedup = Dedup(link, settings.redis.dedup_ttl_seconds, 10)
    try:
        deadline = time.monotonic() + 10
        while await dedup.seen(keys) != set(keys):
            assert time.monotonic() < deadline, "the gateway never remembered the committed ids"
            await asyncio.sleep(0.05)
    finally:
        await link.close()


async def test_ids_the_cache_knows_are_skipped_without_asking_the_database(backend: dict[str, str]) -> None:
    settings = settings_for(backend, dialects=UNLIMITED)
    async with running(settings) as (app, client):
        first = await call(app, "/track", COHORLY, tracked(("a", "id-a"), ("b", "id-b")))
        assert (first.status, first.json()) == (200, {"status": 1, "inserted": 2})
        if backend["name"] == "postgres":
            await _cached(settings, [("shop", "cohorly", "id-a"), ("shop", "cohorly", "id-b")])
        # The database no longer has them: only the cache can refuse them now.
        await _forget_stored_events(backend)
        again = await call(app, "/track", COHORLY, tracked(("a", "id-a"), ("b", "id-b"), ("c", "id-c")))
        assert (again.status, again.json()) == (200, {"status": 1, "inserted": 1})
        assert await names(client) == ["c"]
        # Per project and dialect: the same ids elsewhere are new.
        blog = await call(app, "/track", {"x-cohorly-token": "tok_blog"}, tracked(("a", "id-a")))
        assert blog.json() == {"status": 1, "inserted": 1}
        client_events = json.dumps([{"name": "a", "external_id": "p", "insert_id": "id-a"}]).encode()
        assert (await call(app, "/api/client/events", CLIENT, client_events)).status == 204
        assert sorted(await names(client)) == ["a", "c"]


@contextlib.asynccontextmanager
async def _write_lock(backend: dict[str, str]) -> AsyncIterator[None]:
    """Hold the lock every insert into events waits for, then let go."""
    url = backend["storage_url"]
    if backend["name"] == "sqlite":
        db = sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
        return
    import asyncpg

    conn = await asyncpg.connect("postgresql://" + url.removeprefix("postgresql+asyncpg://"))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # reads go on, writes wait
            yield
    finally:
        await conn.close()


async def test_the_answer_waits_for_the_commit(backend: dict[str, str]) -> None:
    async with running(settings_for(backend, dialects=UNLIMITED)) as (app, client):
        # The writer's connection made first: on SQLite, connecting (its
        # journal_mode pragma) while another holds the lock finds it busy at once.
        assert (await call(app, "/track", COHORLY, tracked(("first", "id-first")))).status == 200
        async with _write_lock(backend):
            answer = asyncio.ensure_future(call(app, "/track", COHORLY, tracked(("held", "id-held"))))
            await asyncio.sleep(0.5)
            assert not answer.done()  # not acknowledged while the database cannot commit
            if backend["name"] == "postgres":  # (SQLite's readers take the write lock too)
                assert await names(client) == ["first"]
        reply = await asyncio.wait_for(answer, 30)
        assert (reply.status, reply.json()) == (200, {"status": 1, "inserted": 1})
        assert await names(client) == ["first", "held"]


# -- the metrics, per dialect and project -------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_events_are_counted_under_their_own_project(backend: dict[str, str]) -> None:
    async with running(settings_for(backend, dialects=UNLIMITED)) as (app, client):
        # One batch spanning two projects by per-record tokens; resent whole.
        batch = json.dumps([
            {"event": "s1", "properties": {"distinct_id": "u", "$insert_id": "s1"}},
            {"event": "s2", "properties": {"distinct_id": "u", "$insert_id": "s2"}},
            {"event": "b1", "properties": {"distinct_id": "u", "$insert_id": "b1", "token": "tok_blog"}},
            {"event": "n", "properties": {"distinct_id": "u"}},  # no insert id: stored each time
        ]).encode()
        for _ in range(2):
            assert (await call(app, "/track", COHORLY, batch)).status == 200
        assert (await call(app, "/track", {"x-cohorly-token": "nope"}, batch)).status == 401
        assert (await call(app, "/v1/ingest", INSLYTIC, inslytic("i1", "i2"))).status == 202
        metrics = _samples((await client.get("/metrics")).text)
    cohorly_shop, cohorly_blog = '{dialect="cohorly",project="shop"}', '{dialect="cohorly",project="blog"}'
    assert metrics["dialgate_events_received_total" + cohorly_shop] == 6
    assert metrics["dialgate_events_stored_total" + cohorly_shop] == 4
    assert metrics["dialgate_events_deduplicated_total" + cohorly_shop] == 2
    assert metrics["dialgate_events_received_total" + cohorly_blog] == 2
    assert metrics["dialgate_events_stored_total" + cohorly_blog] == 1
    assert metrics["dialgate_events_deduplicated_total" + cohorly_blog] == 1
    assert metrics['dialgate_events_stored_total{dialect="inslytic",project="shop"}'] == 2
    # A (dialect, project) seen has all three series, zero included.
    assert metrics['dialgate_events_deduplicated_total{dialect="inslytic",project="shop"}'] == 0
    assert metrics['dialgate_rejections_total{dialect="cohorly",reason="unauthorized"}'] == 1
    assert metrics['dialgate_request_duration_seconds_count{dialect="cohorly",endpoint="track"}'] == 3
    assert metrics['dialgate_request_duration_seconds_count{dialect="inslytic",endpoint="ingest"}'] == 1


# -- 2. the whole body within server.read_timeout -----------------------------------------


async def _trickle(seconds: float) -> AsyncIterator[bytes]:
    yield b'[{"event":"slow","properties":{"distinct_id":"u"'
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        yield b" "
    yield b"}}]"



async def test_a_trickling_body_is_refused_in_time_and_stores_nothing(backend) -> None:
    async with gateway(settings_for(backend, server={"read_timeout": 1})) as client:
        started = time.monotonic()
        reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, content=_trickle(4))
        elapsed = time.monotonic() - started
        assert reply.status_code == 400
        assert reply.json() == {"status": 0, "error": "request body not received within 1 s"}
        assert elapsed < 3.5, elapsed
        # A prompt client is served as usual meanwhile and after.
        ok = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                               json={"event": "fast", "properties": {"distinct_id": "u"}})
        assert ok.status_code == 200
        assert [e["name"] for e in await events_of(client)] == ["fast"]

