"""`dialgate replay`: quarantined records re-run through the current
dialect code and pipeline (translation, the ids' limits, dedup, the sink),
as if they had just been received, at their original receipt time.

Each rejection row is re-run alone, through the request its dialect builds
from the row's payload (dialects.replay) and a current credential of the
row's project. Replaying is idempotent: an event keeps its insert id, and
one without gets one made of the row's id (`replay:<row>:<n>`), so the
database's unique key stores it once however often it is replayed. The
rows stay in the quarantine (until retention removes them); what is
rejected again is counted, not quarantined a second time.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import select

from dialects.base import Dialect, Endpoint, Failure
from gateway.config import lookups_for, project_options
from gateway.dedup import Dedup
from gateway.http import ClientAddress
from gateway.metrics import Metrics
from gateway.model import Event, Record
from gateway.pipeline import Ingest, Services
from gateway.quarantine import Sampler
from gateway.ratelimit import Limiter
from gateway.redislink import RedisLink
from storage import tables
from storage.engine import create_engine
from storage.factory import open_sink
from storage.sink import SinkKind, SinkOptions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from gateway.config import Settings

# Rows read per query.
PAGE = 200


class Report(msgspec.Struct, kw_only=True):
    rows: int = 0  # quarantine rows of the project and reason (and since)
    replayed: int = 0  # re-run, whatever came of it
    stored: int = 0  # events newly stored
    duplicates: int = 0  # events stored before (an earlier replay)
    applied: int = 0  # profile operations applied
    quarantined_again: int = 0  # rows refused or dropped again
    again: dict[str, int] = {}  # why, by reason (or refusal kind)
    not_replayable: int = 0  # rows without a payload, or whose dialect cannot re-run it now


def parse_time(value: str) -> int:
    """Unix milliseconds, or an ISO 8601 date or time (UTC unless it says)."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (unix ms, or ISO 8601 like 2026-12-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def dialects_of(settings: Settings) -> dict[str, Dialect]:
    """The enabled dialects, built as the app builds them."""
    built: dict[str, Dialect] = {}
    for cls in settings.registry:
        config = settings.dialect_config(cls.name)
        if not config.enabled:
            continue
        lookups = lookups_for(settings, cls)
        primary = cls.credential_lists[0].field if cls.credential_lists else None
        built[cls.name] = cls(config, lookups[primary] if primary is not None else {},
                              project_options(settings, cls.project_fields), lookups)
    return built


class Replay:
    def __init__(self, settings: Settings, engine: AsyncEngine, link: RedisLink | None) -> None:
        self._settings = settings
        self._engine = engine
        sampler = Sampler(settings.quarantine.per_minute, settings.quarantine.excerpt_bytes)
        self.services = Services(client_address=ClientAddress([]), sampler=sampler, metrics=Metrics(),
                                 unavailable_retry_after=settings.storage.unavailable_retry_after)
        storage = settings.storage
        options = SinkOptions(max_rows=storage.batch_max_rows, delay_ms=storage.batch_delay_ms,
                              lanes=storage.writer_lanes, max_backlog_rows=storage.max_backlog_rows,
                              max_profile_bytes=storage.max_profile_bytes)
        self.services.sink = open_sink(SinkKind(settings.sink.kind), engine, options, clock=self.services.clock,
                                       admit=sampler.admit)
        self.services.limiter = Limiter(link)
        self.services.dedup = Dedup(link, settings.redis.dedup_ttl_seconds, settings.redis.local_dedup_max_entries)
        self._dialects = dialects_of(settings)

    async def run(self, project: str, reason: str, since_ms: int | None) -> Report:
        report = Report()
        sink = self.services.sink
        sink.start()
        try:
            after = 0
            while rows := await self._page(project, reason, since_ms, after):
                for row in rows:
                    after = row.id
                    report.rows += 1
                    await self._one(row, report)
        finally:
            await sink.close()
            await self.services.dedup.close()
        return report

    async def _page(self, project: str, reason: str, since_ms: int | None, after: int) -> list[Any]:
        r = tables.rejections
        query = select(r.c.id, r.c.project, r.c.source, r.c.payload, r.c.endpoint, r.c.received_at).where(
            r.c.project == project, r.c.reason == reason, r.c.id > after)
        if since_ms is not None:
            query = query.where(r.c.received_at >= since_ms)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query.order_by(r.c.id).limit(PAGE))).all())

    async def _one(self, row: Any, report: Report) -> None:
        dialect = self._dialects.get(row.source)
        endpoint = _endpoint(dialect, row.endpoint) if dialect is not None else None
        request = None
        if dialect is not None and endpoint is not None and row.payload is not None:
            request = dialect.replay_request(row.project, endpoint.name, row.payload, row.received_at)
        if dialect is None or endpoint is None or request is None:
            report.not_replayable += 1
            return
        outcome, again = await Ingest(dialect, endpoint, self.services).rerun(request, lambda rs: _keyed(rs, row.id))
        report.replayed += 1
        if isinstance(outcome, Failure):
            if outcome.kind == "unavailable":
                raise RuntimeError("storage unavailable: replay stopped (run it again; it is idempotent)")
            report.quarantined_again += 1
            report.again[outcome.kind] = report.again.get(outcome.kind, 0) + 1
            return
        report.stored += outcome.inserted
        report.duplicates += outcome.duplicates
        report.applied += outcome.applied
        if again:
            report.quarantined_again += 1
            for reason, count in Counter(r.reason for r in again).items():
                report.again[reason] = report.again.get(reason, 0) + count


def _endpoint(dialect: Dialect, name: str | None) -> Endpoint | None:
    return next((e for e in dialect.endpoints() if e.name == name), None)


def _keyed(records: list[Record], row_id: int) -> list[Record]:
    """Events without an insert id get one of the quarantine row's."""
    keyed: list[Record] = []
    n = 0
    for record in records:
        if type(record) is Event and record.insert_id is None:
            record = msgspec.structs.replace(record, insert_id=f"replay:{row_id}:{n}")
            n += 1
        keyed.append(record)
    return keyed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, help="the project's name")
    parser.add_argument("--reason", required=True, help="the rejections' reason code (as the admin API lists it)")
    parser.add_argument("--since", help="only rows received at or after: unix ms or ISO 8601 (UTC)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since) if args.since is not None else None
    except ValueError as exc:
        print(f"dialgate: replay: --since: {exc}", file=sys.stderr)
        return 2
    if args.project not in {p.name for p in settings.projects}:
        print(f"dialgate: replay: unknown project {args.project!r} (not in the configuration)", file=sys.stderr)
        return 2
    report = await replay(settings, args.project, args.reason, since)
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode() + "\n")
    return 0


async def replay(settings: Settings, project: str, reason: str, since_ms: int | None = None) -> Report:
    engine = create_engine(settings.storage.url)
    link = None
    if settings.redis.url:
        link = RedisLink(settings.redis.url, prefix=settings.redis.key_prefix,
                         retry_interval=settings.redis.retry_interval)
    try:
        return await Replay(settings, engine, link).run(project, reason, since_ms)
    finally:
        if link is not None:
            await link.close()
        await engine.dispose()
