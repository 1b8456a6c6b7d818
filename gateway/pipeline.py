"""The ingestion pipeline, the same ordered stages for every dialect:

0. on a path several dialects serve (`Shared`), the dialect is picked by the
   credential the request carries, once its body is decoded (stage 2);
   everything else runs as for a path of one dialect
1. per-client-IP limits: `[limits] per_ip` and the dialect's own window
   (they need neither the credentials nor the body, so they are asked
   first and their answer wins; in Redis they are answered while the raw
   body is read), and the dialect's `precheck` of a header credential
2. body: counted against the worker's bytes in flight, capped while
   reading; the limits' answer is awaited before the Content-Encoding is
   undone (with the same cap), so a refused request is never inflated or
   parsed
3. translation by the dialect: credentials -> project, validation, records
3b. per-project limit (when the dialect has one), costed by the batch, so
   refused and invalid requests cost nothing
4. dedup fast path: one cache round trip for the batch's insert ids
5. persist through the sink (storage.sink: group commit); the answer waits for the commit
6. remember the newly committed insert ids
7. the dialect renders the outcome in the vendor's shape (a refusal's
   problem list capped first)

An exception out of any stage is answered in the dialect's shape (the
`internal` kind, 500) and logged with its traceback at most once a minute
per dialect and error type.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from dialects.base import Batch, Dialect, Endpoint, Failure, Incoming, Outcome, Reply, SlidingWindow
from dialects.limits import bounded
from gateway import logs
from gateway.dedup import Dedup, Key
from gateway.http import (
    BadEncoding,
    BodyReader,
    ClientAddress,
    ClientGone,
    Cors,
    Deadlines,
    InflightBytes,
    Overloaded,
    TooLarge,
    decode_body,
    header_dict,
)
from gateway.metrics import Metrics
from gateway.model import MAX_ID_BYTES, MAX_INSERT_ID, Event, Record, Rejection, long_id
from gateway.quarantine import Sampler
from gateway.ratelimit import Limiter, retry_after_seconds
from storage.sink import Sink, StorageUnavailable, Unstorable

log = logging.getLogger("dialgate.ingest")
# The one line of a rejected request (in JSON, the dialect's message is `detail`).
REJECTED = logs.Line(log, "rejected", "dialect=%s endpoint=%s status=%d reason=%s ip=%s message=%r",
                     renamed={"message": "detail"})

# The limiter's name for `[limits] per_ip`: a window of its own, apart from
# any dialect's.
PER_IP = "per_ip"
# Seconds a client is told to wait when the worker holds all the request
# body bytes it may.
OVERLOADED_RETRY_AFTER = 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Services:
    """What the stages need; filled in by the app's lifespan."""

    sink: Sink
    limiter: Limiter
    dedup: Dedup

    def __init__(self, *, client_address: ClientAddress, sampler: Sampler, metrics: Metrics,
                 unavailable_retry_after: int, body_timeout: float = 30.0,
                 max_inflight_bytes: int = 64 * 1024 * 1024, per_ip: SlidingWindow | None = None,
                 allow_headers: bytes = Cors.allow_headers(()),
                 clock: Callable[[], int] = now_ms) -> None:
        self.body_timeout = body_timeout
        self.inflight = InflightBytes(max_inflight_bytes)
        self.per_ip = per_ip
        self.allow_headers = allow_headers
        self.errors = ErrorLog()
        self.deadlines = Deadlines(body_timeout)
        self.client_address = client_address
        self.sampler = sampler
        self.metrics = metrics
        self.unavailable_retry_after = unavailable_retry_after
        self.clock = clock


class Ingest:
    """One ingestion route: an ASGI app running the pipeline for a dialect."""

    def __init__(self, dialect: Dialect, endpoint: Endpoint, services: Services) -> None:
        self.dialect = dialect
        self.endpoint = endpoint
        self.services = services
        # This route's child of the duration histogram, bound once.
        self.timer = services.metrics.timer(dialect.name, endpoint.name)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] == "OPTIONS":
            await Cors.preflight(scope, send, self.services.allow_headers)
            return
        started = time.perf_counter()
        services = self.services
        headers = header_dict(scope)
        reader = BodyReader(receive, services.inflight)
        request = Incoming(
            endpoint=self.endpoint.name,
            method=scope["method"],
            headers=headers,
            query=_query(scope),
            body=b"",
            client_ip=services.client_address(scope, headers),
            received_at=services.clock(),
        )
        # The route that answers: this one, or on a shared path the one the
        # credential picked.
        route = self
        try:
            try:
                result, request, route = await self._run(request, reader)
            except ClientGone:
                return
            except Exception as exc:  # a bug: still answered in the dialect's shape
                services.errors.report(self.dialect.name, "pipeline", exc)
                result = INTERNAL
            if isinstance(result, Failure):
                result = bounded(result)
            reply = route._render(request, result)
        finally:
            reader.release()
        if isinstance(result, Failure):
            route._log_rejected(request, result, reply)
        await _send(send, reply, Cors.headers(headers.get("origin")))
        await reader.drain()
        route.timer.observe(time.perf_counter() - started)

    def _render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        try:
            return self.dialect.render(request, result)
        except Exception as exc:  # a bug: answered as one
            self.services.errors.report(self.dialect.name, "render", exc)
        try:
            return self.dialect.render(request, INTERNAL)
        except Exception as exc:
            self.services.errors.report(self.dialect.name, "render", exc)
            return FALLBACK

    async def _run(self, request: Incoming, reader: BodyReader) -> tuple[Outcome | Failure, Incoming, Ingest]:
        # The client's windows are asked first and their answer comes first:
        # over a limit, the request is refused whatever its credentials or
        # body. Redis answers while the raw body is read; the answer is
        # awaited before the body is inflated or parsed.
        admissions = self._admissions(request)
        refused = self.dialect.precheck(request)
        if refused is not None:
            if (limited := await refusal_of(admissions)) is not None:
                refused = limited
            await reader.refuse(request.headers)
            return refused, request, self
        raw = await self._read(request, reader)
        if (limited := await refusal_of(admissions)) is not None:
            await reader.drain()
            return limited, request, self
        if isinstance(raw, Failure):
            return raw, request, self
        decoded = self._decode(request, raw)
        if isinstance(decoded, Failure):
            return decoded, request, self
        return await self._process(decoded), decoded, self

    async def _process(self, request: Incoming) -> Outcome | Failure:
        """Stages 3 to 6, for a request whose body is read and decoded."""
        translated = self._translate(request)
        if isinstance(translated, Failure):
            return translated
        if translated.cost and translated.project is not None:
            bucket = self.dialect.project_limit(translated.project)
            if bucket is not None:
                limiter = self.services.limiter
                wait = await limiter.bucket(self.dialect.name, translated.project, bucket, translated.cost)
                if wait:
                    return _rate_limited(wait)
        return await self._store(translated)

    async def rerun(self, request: Incoming, keyed: Callable[[list[Record]], list[Record]]
                    ) -> tuple[Outcome | Failure, list[Rejection]]:
        """Stages 3 to 6 for a quarantined record (gateway.replay): no rate
        limit; `keyed` gives events their insert ids; what is rejected again
        is returned, not quarantined again."""
        translated = self._translate(request)
        if isinstance(translated, Failure):
            return translated, []
        return await self._store(Batch(records=keyed(translated.records))), translated.rejections

    def _admissions(self, request: Incoming) -> list[asyncio.Future[int]]:
        services, endpoint = self.services, self.endpoint
        asked = []
        if services.per_ip is not None and endpoint.per_ip:
            asked.append(services.limiter.sliding(PER_IP, request.client_ip, services.per_ip))
        window = self.dialect.ip_limit() if endpoint.ip_limited else None
        if window is not None:
            asked.append(services.limiter.sliding(self.dialect.name, request.client_ip, window))
        return asked

    async def _read(self, request: Incoming, reader: BodyReader) -> bytes | Failure:
        """Stage 2, the raw body: read within bounds, not yet inflated."""
        services = self.services
        if request.method == "GET":
            return b""
        try:
            # The whole body within the deadline: a client trickling a
            # byte at a time cannot hold a connection (and memory) forever.
            return await reader.read(request.headers, self.endpoint.max_body, services.deadlines)
        except TimeoutError:
            return Failure(kind="bad_request",
                           message=f"request body not received within {services.body_timeout:g} s")
        except TooLarge:
            # Consume the rest first (bounded), so the 413 can never be
            # overtaken by a reset of a connection with unread data.
            await reader.drain()
            return TOO_LARGE
        except Overloaded:
            await reader.refuse(request.headers)
            return Failure(kind="unavailable", message="too many request bytes in flight",
                           retry_after=OVERLOADED_RETRY_AFTER)

    def _decode(self, request: Incoming, raw: bytes) -> Incoming | Failure:
        """Stage 2's decoding: the request with its body inflated."""
        if request.method == "GET":
            return request
        try:
            body = decode_body(raw, request.headers.get("content-encoding", ""), self.endpoint.max_body)
        except TooLarge:
            return TOO_LARGE
        except BadEncoding as exc:
            return Failure(kind="bad_request", message=str(exc))
        return Incoming(
            endpoint=request.endpoint, method=request.method, headers=request.headers,
            query=request.query, body=body, client_ip=request.client_ip,
            received_at=request.received_at,
        )

    def _translate(self, request: Incoming) -> Batch | Failure:
        """Stage 3, the dialect's translation, and the ids' length limits."""
        translated = self.dialect.translate(request)
        if isinstance(translated, Failure):
            return translated
        for record in translated.records:
            if (field := long_id(record)) is not None:
                limit = f"{MAX_INSERT_ID} characters" if field == "insert_id" else f"{MAX_ID_BYTES} bytes"
                return Failure(kind="invalid", message=f"{field} is longer than {limit}",
                               details=(f"{field}: longer than {limit}",))
        return translated

    async def _store(self, batch: Batch) -> Outcome | Failure:
        services = self.services
        source = self.dialect.name
        rejections = [services.sampler.bound(r) for r in batch.rejections if services.sampler.admit(r)]
        for r in batch.rejections:
            services.metrics.rejection(source, r.reason)
        records: list[Record] = batch.records
        keys = _keys(records)
        cached = await services.dedup.seen(keys) if keys else set()
        if cached:
            records = [
                r for r in records
                if not (type(r) is Event and (r.project, r.source, r.insert_id) in cached)
            ]
        skipped = len(batch.records) - len(records)
        if not records:
            services.sink.quarantine(rejections)
            self._count(batch, (), ())
            return Outcome(duplicates=skipped)
        try:
            written = await services.sink.submit(records, rejections)
        except StorageUnavailable:
            return Failure(kind="unavailable", message="storage unavailable",
                           retry_after=services.unavailable_retry_after)
        except Unstorable:
            return Failure(kind="unstorable", message="the database refused this data")
        await services.dedup.remember(written.new_keys)
        self._count(batch, written.new_keys, records)
        # What the storage refused inside its transaction (alias conflicts,
        # profile type mismatches and size), counted as the dialect's.
        for reason in written.refused:
            services.metrics.rejection(source, reason)
        return Outcome(
            inserted=written.inserted,
            duplicates=skipped + written.duplicates,
            applied=written.applied,
            aliases=tuple(written.aliases),
        )

    def _count(self, batch: Batch, stored: Collection[Key], written: Collection[Record]) -> None:
        """Per event, under its own project (a batch may span projects): the
        events received, and of those the ones stored (a new insert id, or
        none at all) and skipped as duplicates."""
        metrics, dialect = self.services.metrics, self.dialect.name
        received = Counter([r.project for r in batch.records if type(r) is Event])
        kept = Counter([key[0] for key in stored])
        kept.update([r.project for r in written if type(r) is Event and r.insert_id is None])
        for project, count in received.items():
            metrics.events(dialect, project, count, kept[project])

    def _log_rejected(self, request: Incoming, failure: Failure, reply: Reply) -> None:
        self.services.metrics.rejection(self.dialect.name, failure.kind)
        # Never the credentials or the body: the dialect's message names fields only.
        REJECTED(self.dialect.name, request.endpoint, reply.status, failure.kind, request.client_ip,
                 failure.message[:200])


INTERNAL = Failure(kind="internal", message="internal error")
TOO_LARGE = Failure(kind="too_large", message="request body too large")
# When even rendering the internal error fails.
FALLBACK = Reply(status=500, body=b'{"error":"internal error"}')


class ErrorLog:
    """Unexpected exceptions, logged with their traceback at most once a
    minute per (dialect, stage, error type); the rest are counted and the
    count is given with the next one logged."""

    PERIOD = 60.0

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, str], float] = {}
        self._quiet: Counter[tuple[str, str, str]] = Counter()

    def report(self, dialect: str, stage: str, exc: BaseException) -> None:
        key = (dialect, stage, type(exc).__qualname__)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.PERIOD:
            self._quiet[key] += 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        log.error("unexpected error dialect=%s stage=%s error=%s (%d more since the last logged)",
                  dialect, stage, key[2], quiet, exc_info=exc)


async def refusal_of(admissions: list[asyncio.Future[int]]) -> Failure | None:
    """The refusal of the most restrictive window that refused, if any."""
    wait = 0
    for admission in admissions:
        wait = max(wait, await admission)
    return _rate_limited(wait) if wait else None


def _rate_limited(wait_ms: int) -> Failure:
    return Failure(kind="rate_limited", message="rate limited", retry_after=retry_after_seconds(wait_ms))


def _keys(records: list[Record]) -> list[Key]:
    return [
        (r.project, r.source, r.insert_id)
        for r in records
        if type(r) is Event and r.insert_id is not None
    ]


def _query(scope: dict[str, Any]) -> list[tuple[str, str]]:
    raw = scope.get("query_string", b"")
    if not raw:
        return []
    from urllib.parse import parse_qsl

    return parse_qsl(raw.decode("latin-1"), keep_blank_values=True)


async def _send(send: Any, reply: Reply, cors: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-length", str(len(reply.body)).encode())]
    if reply.content_type:
        headers.append((b"content-type", reply.content_type.encode()))
    headers += [(k.encode(), v.encode()) for k, v in reply.headers]
    headers += cors
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
