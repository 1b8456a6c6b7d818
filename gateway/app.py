"""The application factory: routes from the dialect registry, resources in
the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from gateway import retention
from gateway.access import AccessLog
from gateway.admin import Admin, AdminLog
from gateway.config import Settings, lookups_for, project_options
from gateway.dedup import Dedup
from gateway.http import ClientAddress, Cors
from gateway.metrics import Metrics
from gateway.openapi import routes as openapi_routes
from gateway.pipeline import Ingest, Services
from gateway.probes import Probes
from gateway.quarantine import Sampler
from gateway.ratelimit import Limiter
from gateway.redislink import RedisLink
from gateway.shared import Shared
from storage.engine import create_engine
from storage.factory import open_sink
from storage.migrate import upgrade
from storage.sink import SinkKind, SinkOptions, StreamOptions

log = logging.getLogger("dialgate")


class State:
    engine: Any = None
    redis: RedisLink | None = None
    dedup: Dedup | None = None
    sink: Any = None
    metrics: Metrics


def build_app(settings: Settings, *, migrate: bool | None = None) -> Any:
    metrics = Metrics(redis=bool(settings.redis.url))
    sampler = Sampler(settings.quarantine.per_minute, settings.quarantine.excerpt_bytes)
    services = Services(
        client_address=ClientAddress(settings.server.trusted_proxies),
        sampler=sampler,
        metrics=metrics,
        unavailable_retry_after=settings.storage.unavailable_retry_after,
        body_timeout=settings.server.read_timeout,
        max_inflight_bytes=settings.server.max_inflight_bytes,
        per_ip=settings.limits.per_ip,
        # Every installed dialect's, enabled or not: one answer for all paths.
        allow_headers=Cors.allow_headers(h for d in settings.registry for h in d.cors_headers),
    )
    state = State()
    state.metrics = metrics

    ingestion = ingestion_routes(settings, services)
    admin = Admin(settings.admin.keys, {p.name for p in settings.projects}, state,
                  retry_after=settings.storage.unavailable_retry_after)
    # With admin.bind the admin API, /readyz and /metrics are served by an
    # app of their own (on its own listener, see gateway.cli); the public
    # app keeps /healthz only (a load balancer's health check learns nothing
    # from it) and answers 404 for the rest.
    admin_app: Any = None
    routes: list[Route] = admin.routes()
    if settings.admin.bind:
        admin_app = Starlette(routes=routes)
        admin_app.router.redirect_slashes = False
        admin_app = AdminLog(admin_app)
        routes = [admin.health_route()]
    # The dialects' API descriptions are public, like the APIs themselves.
    routes += openapi_routes(settings)
    should_migrate = settings.storage.migrate_on_start if migrate is None else migrate
    sink_options = SinkOptions(
        max_rows=settings.storage.batch_max_rows,
        delay_ms=settings.storage.batch_delay_ms,
        lanes=settings.storage.writer_lanes,
        max_backlog_rows=settings.storage.max_backlog_rows,
        max_profile_bytes=settings.storage.max_profile_bytes,
        keep_days=retention.quarantine_days(settings),
        stream=stream_options(settings),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine = create_engine(settings.storage.url)
        if should_migrate:
            await upgrade(engine)
        link = None
        if settings.redis.url:
            link = RedisLink(
                settings.redis.url, prefix=settings.redis.key_prefix,
                retry_interval=settings.redis.retry_interval,
                failure_window=settings.redis.failure_window,
            )
            if not await link.ping():
                log.warning("starting without redis; limits are in-process until it answers")
        sink = open_sink(SinkKind(settings.sink.kind), engine, sink_options, clock=services.clock,
                         admit=sampler.admit, on_commit=metrics.observe_commit)
        sink.start()
        services.sink = sink
        services.limiter = Limiter(link)
        services.dedup = Dedup(link, settings.redis.dedup_ttl_seconds, settings.redis.local_dedup_max_entries)
        state.engine, state.redis, state.dedup, state.sink = engine, link, services.dedup, sink
        probes = Probes(metrics, sink=sink, engine=engine, redis=link)
        metrics.sample_with(probes.sample)
        # With workers, each keeps its gauges fresh for the scrapes another answers.
        sampling = asyncio.create_task(probes.run()) if metrics.directory else None
        daily = retention.daily_at(settings)
        pruning = retention.DailyPrune(engine, settings, daily) if daily is not None else None
        if pruning is not None:
            pruning.start()
        try:
            yield
        finally:
            if pruning is not None:
                await pruning.stop()
            if sampling is not None:
                sampling.cancel()
            await sink.close()
            await services.dedup.close()
            if link is not None:
                await link.close()
            await engine.dispose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.state.dialgate = state
    dispatch = Dispatch(ingestion, app if admin_app is not None else AdminLog(app))
    dispatch.admin = Dispatch({}, admin_app) if admin_app is not None else None

    def reconfigure(new: Settings) -> None:
        # Everything is built before anything is swapped, and nothing awaits
        # in between: a request sees the old configuration or the new one,
        # whole. One being served keeps the route (dialect, credentials) it
        # started on; it asked the per-IP window before its first await.
        routes = ingestion_routes(new, services)
        services.per_ip = new.limits.per_ip
        admin.configure(new.admin.keys, {p.name for p in new.projects})
        dispatch.routes = routes

    dispatch.reconfigure = reconfigure
    if settings.logging.access_log:
        # Outermost: every request as the client sent it, a 405 of Dispatch's included.
        logged = AccessLog(dispatch)
        logged.admin = AccessLog(dispatch.admin) if dispatch.admin is not None else None
        logged.reconfigure = reconfigure
        return logged
    return dispatch


def ingestion_routes(settings: Settings, services: Services) -> dict[str, tuple[frozenset[str], Any]]:
    """path -> (methods, app): the ingestion routes, dispatched by exact path
    ahead of Starlette's stack (this is the hot path; admin goes through it)."""
    ingestion: dict[str, tuple[frozenset[str], Any]] = {}
    for path, members in _routes(settings, services).items():
        methods = frozenset(m for member in members for m in (*member.endpoint.methods, "OPTIONS"))
        # A path of several dialects picks one per request (gateway.shared).
        ingestion[path] = (methods, members[0] if len(members) == 1 else Shared(members, services))
    return ingestion


def stream_options(settings: Settings) -> StreamOptions:
    """The log sink's `[sink]` settings (also `dialgate load`'s)."""
    sink = settings.sink
    return StreamOptions(
        servers=tuple(sink.servers), stream=sink.stream, replicas=sink.replicas,
        duplicate_window=float(sink.duplicate_window_seconds), ack_timeout=sink.ack_timeout_seconds,
        max_age=sink.max_age_hours * 3600.0,
    )


def _routes(settings: Settings, services: Services) -> dict[str, list[Ingest]]:
    """path -> one route per enabled dialect serving it, in registry order."""
    routes: dict[str, list[Ingest]] = {}
    credentialed: set[str] = set()
    for dialect_class in settings.registry:
        config = settings.dialect_config(dialect_class.name)
        if not config.enabled:
            continue
        lookups = lookups_for(settings, dialect_class)
        if any(lookups.values()):
            credentialed.add(dialect_class.name)
        primary = dialect_class.credential_lists[0].field if dialect_class.credential_lists else None
        dialect = dialect_class(
            config,
            lookups[primary] if primary is not None else {},
            project_options(settings, dialect_class.project_fields),
            lookups,
        )
        for endpoint in dialect.endpoints():
            routes.setdefault(endpoint.path, []).append(Ingest(dialect, endpoint, services))
    for path, members in routes.items():
        if len(members) > 1:
            # No credential can pick a dialect no project has a credential
            # of: it leaves a shared path to the others, whose contract then
            # holds there exactly as if it were alone (methods, answers).
            routes[path] = [m for m in members if m.dialect.name in credentialed] or members[:1]
    return routes


class Dispatch:
    """Exact-path routing for the ingestion endpoints; the rest to `fallback`.
    Every path is served with or without a trailing slash (`/track/` as
    `/track`), without a redirect."""

    def __init__(self, routes: dict[str, tuple[frozenset[str], Any]], fallback: Any) -> None:
        self.routes = routes
        self.fallback = fallback
        # The app of the admin listener (admin.bind), started by this one's
        # lifespan; None when this app serves the admin API itself.
        self.admin: Dispatch | None = None
        # Swaps in the routes, limits and admin keys of new settings
        # (gateway.reload); set by build_app.
        self.reconfigure: Callable[[Settings], None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        route = self.routes.get(scope["path"])
        if route is None:
            await self.fallback(scope, receive, send)
            return
        methods, app = route
        if scope["method"] in methods:
            await app(scope, receive, send)
            return
        allow = ", ".join(sorted(methods)).encode()
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", allow), (b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", b"18")]})
        await send({"type": "http.response.body", "body": b"Method Not Allowed"})
