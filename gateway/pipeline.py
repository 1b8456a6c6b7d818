"""The ingestion pipeline, the same ordered stages for every dialect:

1. per-client-IP rate limit (when the dialect has one; needs neither the
   credentials nor the body, so it is asked first and its answer wins; in
   Redis it is answered while stages 2 and 3 run, and stage 4's question
   goes in the same round trip)
2. body: capped while reading, Content-Encoding undone with the same cap
3. translation by the dialect: credentials -> project, validation, records
3b. per-project limit (when the dialect has one), costed by the batch, so
   refused and invalid requests cost nothing
4. dedup fast path: one cache round trip for the batch's insert ids
5. persist through the batched writer; the answer waits for the commit
6. remember the newly committed insert ids
7. the dialect renders the outcome in the vendor's shape
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from dialects.base import Batch, Dialect, Endpoint, Failure, Incoming, Outcome, Reply
from gateway import logs
from gateway.dedup import Dedup, Key
from gateway.http import (
    BadEncoding,
    BodyReader,
    ClientAddress,
    ClientGone,
    Cors,
    Deadlines,
    TooLarge,
    decode_body,
    header_dict,
)
from gateway.metrics import Metrics
from gateway.model import MAX_ID_BYTES, MAX_INSERT_ID, Event, Record, long_id
from gateway.quarantine import Sampler
from gateway.ratelimit import Limiter, retry_after_seconds
from storage.writer import StorageUnavailable, Unstorable, Writer

log = logging.getLogger("dialgate.ingest")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Services:
    """What the stages need; filled in by the app's lifespan."""

    writer: Writer
    limiter: Limiter
    dedup: Dedup

    def __init__(self, *, client_address: ClientAddress, sampler: Sampler, metrics: Metrics,
                 unavailable_retry_after: int, body_timeout: float = 30.0,
                 clock: Callable[[], int] = now_ms) -> None:
        self.body_timeout = body_timeout
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

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] == "OPTIONS":
            await Cors.preflight(scope, send)
            return
        started = time.perf_counter()
        services = self.services
        headers = header_dict(scope)
        reader = BodyReader(receive)
        request = Incoming(
            endpoint=self.endpoint.name,
            method=scope["method"],
            headers=headers,
            query=_query(scope),
            body=b"",
            client_ip=services.client_address(scope, headers),
            received_at=services.clock(),
        )
        try:
            result, request = await self._run(request, reader)
        except ClientGone:
            return
        reply = self.dialect.render(request, result)
        if isinstance(result, Failure):
            self._log_rejected(request, result, reply)
        await _send(send, reply, Cors.headers(headers.get("origin")))
        await reader.drain()
        services.metrics.observe(self.dialect.name, time.perf_counter() - started)

    async def _run(self, request: Incoming, reader: BodyReader) -> tuple[Outcome | Failure, Incoming]:
        services = self.services
        window = self.dialect.ip_limit() if self.endpoint.ip_limited else None
        # The client's window is asked first and its answer comes first:
        # over the limit, the request is refused whatever its body. Redis
        # answers while the body is read and translated, and the dedup
        # question about a translated batch rides the same round trip
        # (gateway.redislink.Flight).
        admission = (services.limiter.sliding(self.dialect.name, request.client_ip, window)
                     if window is not None else None)
        translated, request = await self._translate(request, reader)
        lookup = None
        if admission is not None and not isinstance(translated, Failure):
            keys = _keys(translated.records)
            lookup = keys, services.dedup.seen(keys)
        if admission is not None and (wait := await admission):
            return Failure(kind="rate_limited", message="rate limited",
                           retry_after=retry_after_seconds(wait)), request
        if isinstance(translated, Failure):
            return translated, request
        if translated.cost and translated.project is not None:
            bucket = self.dialect.project_limit(translated.project)
            if bucket is not None:
                wait = await services.limiter.bucket(self.dialect.name, translated.project, bucket, translated.cost)
                if wait:
                    return Failure(kind="rate_limited", message="rate limited",
                                   retry_after=retry_after_seconds(wait)), request
        return await self._store(translated, lookup), request

    async def _translate(self, request: Incoming, reader: BodyReader) -> tuple[Batch | Failure, Incoming]:
        """Stages 2 and 3: the body, read within bounds, and the dialect's
        translation of the request."""
        services = self.services
        if request.method != "GET":
            try:
                # The whole body within the deadline: a client trickling a
                # byte at a time cannot hold a connection (and memory) forever.
                raw = await reader.read(request.headers, self.endpoint.max_body, services.deadlines)
                body = decode_body(raw, request.headers.get("content-encoding", ""), self.endpoint.max_body)
            except TimeoutError:
                return Failure(kind="bad_request",
                               message=f"request body not received within {services.body_timeout:g} s"), request
            except TooLarge:
                # Consume the rest first (bounded), so the 413 can never be
                # overtaken by a reset of a connection with unread data.
                await reader.drain()
                return Failure(kind="too_large", message="request body too large"), request
            except BadEncoding as exc:
                return Failure(kind="bad_request", message=str(exc)), request
            request = Incoming(
                endpoint=request.endpoint, method=request.method, headers=request.headers,
                query=request.query, body=body, client_ip=request.client_ip,
                received_at=request.received_at,
            )
        translated = self.dialect.translate(request)
        if isinstance(translated, Failure):
            return translated, request
        for record in translated.records:
            if (field := long_id(record)) is not None:
                limit = f"{MAX_INSERT_ID} characters" if field == "insert_id" else f"{MAX_ID_BYTES} bytes"
                return Failure(kind="invalid", message=f"{field} is longer than {limit}",
                               details=(f"{field}: longer than {limit}",)), request
        return translated, request

    async def _store(self, batch: Batch,
                     lookup: tuple[list[Key], asyncio.Future[set[Key]]] | None = None) -> Outcome | Failure:
        services = self.services
        source = self.dialect.name
        rejections = [services.sampler.bound(r) for r in batch.rejections if services.sampler.admit(r)]
        for r in batch.rejections:
            services.metrics.rejection(source, r.reason)
        records: list[Record] = batch.records
        keys, asked = lookup if lookup is not None else (_keys(records), None)
        cached = await (asked or services.dedup.seen(keys)) if keys else set()
        if cached:
            records = [
                r for r in records
                if not (type(r) is Event and (r.project, r.source, r.insert_id) in cached)  # type: ignore[union-attr]
            ]
        skipped = len(batch.records) - len(records)
        if not records:
            services.writer.quarantine(rejections)
            self._count(batch, (), ())
            return Outcome(duplicates=skipped)
        try:
            written = await services.writer.submit(records, rejections)
        except StorageUnavailable:
            return Failure(kind="unavailable", message="storage unavailable",
                           retry_after=services.unavailable_retry_after)
        except Unstorable:
            return Failure(kind="unstorable", message="the database refused this data")
        await services.dedup.remember(written.new_keys)
        self._count(batch, written.new_keys, records)
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
        kept.update([r.project for r in written if type(r) is Event and r.insert_id is None])  # type: ignore[union-attr]
        for project, count in received.items():
            metrics.events(dialect, project, count, kept[project])

    def _log_rejected(self, request: Incoming, failure: Failure, reply: Reply) -> None:
        self.services.metrics.rejection(self.dialect.name, failure.kind)
        # Never the credentials or the body: the dialect's message names fields only.
        logs.info(
            log,
            "rejected dialect=%s endpoint=%s status=%d reason=%s ip=%s message=%r",
            self.dialect.name, request.endpoint, reply.status, failure.kind,
            request.client_ip, failure.message[:200],
        )


def _keys(records: list[Record]) -> list[Key]:
    return [
        (r.project, r.source, r.insert_id)  # type: ignore[union-attr]
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
