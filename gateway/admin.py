"""The admin read API, health and metrics.

Admin answers are JSON, errors included: a malformed query is a 400, a
database that cannot answer now a 503 with `Retry-After`, anything else
unexpected a 500 (its traceback logged at most once a minute per error
type). Every `/admin/` request is logged with its path, status and peer,
never its key (`AdminLog`).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access import StatusNoted
from gateway.erasure import erase_person
from gateway.export import ndjson_response
from gateway.loadmetrics import stream_backlog_text
from gateway.metrics import CONTENT_TYPE
from gateway.timespan import span_of
from storage import queries
from storage.export import Kind, Span
from storage.faults import is_unavailable

log = logging.getLogger("dialgate")

Handler = Callable[[Request], Awaitable[Response]]

# Cursors are event and rejection ids: 64-bit integers.
MAX_CURSOR = 2**63 - 1
# Filters are ids, names, sources and reasons; ids are at most 1,024 bytes.
MAX_FILTER_BYTES = 1024
EVENT_PARAMS = frozenset({"distinct_id", "name", "source", "limit", "after", "since", "until"})
EXPORT_PARAMS = frozenset({"kind", "since", "until"})
REJECTION_PARAMS = frozenset({"project", "source", "reason", "limit", "after"})


class BadQuery(Exception):
    pass


class Admin:
    def __init__(self, keys: list[str], projects: set[str], state: Any, *, retry_after: int = 5) -> None:
        self.configure(keys, projects)
        self._state = state  # .engine, .redis, .metrics once started
        self._retry_after = retry_after
        self._logged: dict[str, float] = {}

    def configure(self, keys: list[str], projects: set[str]) -> None:
        """The keys and projects from now on (at start, and on a reload)."""
        self._keys = [k.encode() for k in keys]
        self._projects = projects

    def routes(self) -> list[Route]:
        """Every route: the admin API, /healthz, /readyz and /metrics."""
        return [
            Route("/admin/v1/projects/{project}/events", self._guard(self.events), methods=["GET"]),
            # `path`: a profile id may contain "/".
            Route("/admin/v1/projects/{project}/profiles/{id:path}", self._guard(self.profile), methods=["GET"]),
            # A group id may contain "/"; the group key is one segment.
            Route("/admin/v1/projects/{project}/groups/{group_key}/{group_id:path}", self._guard(self.group),
                  methods=["GET"]),
            Route("/admin/v1/projects/{project}/people/{id:path}", self._guard(self.erase), methods=["DELETE"]),
            Route("/admin/v1/projects/{project}/export", self._guard(self.export), methods=["GET"]),
            Route("/admin/v1/rejections", self._guard(self.rejections), methods=["GET"]),
            self.health_route(),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    def health_route(self) -> Route:
        return Route("/healthz", self.healthz, methods=["GET"])

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except BadQuery as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except Exception as exc:
                if is_unavailable(exc):
                    return JSONResponse({"error": "database unavailable"}, status_code=503,
                                        headers={"Retry-After": str(self._retry_after)})
                self._log_once(request, exc)
                return JSONResponse({"error": "internal error"}, status_code=500)

        return guarded

    def _log_once(self, request: Request, exc: Exception) -> None:
        kind = type(exc).__name__
        now = time.monotonic()
        if now - self._logged.get(kind, -60.0) >= 60.0:
            self._logged[kind] = now
            log.error("admin %s failed with %s", request.url.path, kind, exc_info=exc)

    def _authorized(self, request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode()
        # Compare against every key, always, in constant time.
        ok = False
        for candidate in self._keys:
            ok |= hmac.compare_digest(given, candidate)
        return ok and scheme.lower() == "bearer"

    def _check(self, request: Request, project: str | None) -> Response | None:
        if not self._authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if project is not None and project not in self._projects:
            return JSONResponse({"error": "unknown project"}, status_code=404)
        return None

    async def events(self, request: Request) -> Response:
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        q = _query(request, EVENT_PARAMS)
        limit, after = _paging(q)
        span = _span(q)
        items, next_ = await queries.events(
            self._state.engine, project,
            distinct_id=q.get("distinct_id"), name=q.get("name"), source=q.get("source"),
            limit=limit, after=after, since=span.since, until=span.until,
        )
        return JSONResponse({"events": items, "next": next_})

    async def export(self, request: Request) -> Response:
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        q = _query(request, EXPORT_PARAMS)
        try:
            kind = Kind(q.get("kind", "events"))
        except ValueError:
            raise BadQuery(f"kind must be one of {', '.join(k.value for k in Kind)}") from None
        span = _span(q)
        if kind is not Kind.EVENTS and not span.open:
            raise BadQuery("since/until select events; profiles, aliases and groups are exported whole")
        return await ndjson_response(self._state.engine, project, kind, span)

    async def profile(self, request: Request) -> Response:
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        id_ = request.path_params["id"]
        if len(id_.encode("utf-8", "replace")) > MAX_FILTER_BYTES:
            raise BadQuery(f"profile id longer than {MAX_FILTER_BYTES} bytes")
        found = await queries.profile(self._state.engine, project, id_)
        if found is None:
            return JSONResponse({"error": "no such profile"}, status_code=404)
        return JSONResponse(found)

    async def erase(self, request: Request) -> Response:
        """Erase a person (gateway.erasure); the answer is the receipt."""
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        id_ = request.path_params["id"]
        if not id_ or len(id_.encode("utf-8", "replace")) > MAX_FILTER_BYTES:
            raise BadQuery(f"person id must be 1 to {MAX_FILTER_BYTES} bytes")
        state = self._state
        receipt = await erase_person(state.engine, state.dedup, project, id_, shared=state.redis is not None)
        return JSONResponse(receipt)

    async def group(self, request: Request) -> Response:
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        group_key, group_id = request.path_params["group_key"], request.path_params["group_id"]
        for name, value in (("group key", group_key), ("group id", group_id)):
            if len(value.encode("utf-8", "replace")) > MAX_FILTER_BYTES:
                raise BadQuery(f"{name} longer than {MAX_FILTER_BYTES} bytes")
        found = await queries.group(self._state.engine, project, group_key, group_id)
        if found is None:
            return JSONResponse({"error": "no such group"}, status_code=404)
        return JSONResponse(found)

    async def rejections(self, request: Request) -> Response:
        project = request.query_params.get("project")
        if (refused := self._check(request, project)) is not None:
            return refused
        q = _query(request, REJECTION_PARAMS)
        limit, after = _paging(q)
        items, next_ = await queries.rejections(
            self._state.engine, project=project, source=q.get("source"), reason=q.get("reason"),
            limit=limit, after=after,
        )
        return JSONResponse({"rejections": items, "next": next_})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, bool] = {}
        try:
            async with self._state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception:
            checks["database"] = False
        extra: dict[str, Any] = {}
        # A sink with a readiness of its own (a stream it must be connected to).
        sink_ready = getattr(self._state.sink, "ready", None)
        if sink_ready is not None:
            checks["sink"] = bool(sink_ready())
        if self._state.redis is not None:
            # A write probe and the last failure of any Redis call, not a
            # PING: a full Redis answers PINGs while refusing every write.
            failure = await self._state.redis.readiness()
            checks["redis"] = failure is None
            if failure is not None:
                extra["redis_failure"] = failure
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", **checks, **extra},
            status_code=200 if ready else 503,
        )

    async def metrics(self, request: Request) -> Response:
        # With the stream sink, the stream's backlog too (asked of the
        # stream: the same for every worker and gateway).
        backlog = await stream_backlog_text(self._state.sink)
        return Response(self._state.metrics.render() + backlog.encode(), headers={"Content-Type": CONTENT_TYPE})


def _query(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query's parameters, each known, given once and of a sane size;
    a NUL reads as U+FFFD, as the writer stores it."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise BadQuery(f"unknown parameter {name[:64]!r}; expected one of {', '.join(sorted(allowed))}")
        if name in found:
            raise BadQuery(f"parameter {name!r} given more than once")
        if len(value.encode("utf-8", "replace")) > MAX_FILTER_BYTES:
            raise BadQuery(f"{name} longer than {MAX_FILTER_BYTES} bytes")
        found[name] = value.replace("\x00", "\ufffd")
    return found


def _span(q: dict[str, str]) -> Span:
    try:
        return span_of(q.get("since"), q.get("until"))
    except ValueError as exc:
        raise BadQuery(str(exc)) from None


def _paging(q: dict[str, str]) -> tuple[int, int | None]:
    limit, after = q.get("limit"), q.get("after")
    size = 100 if limit is None else _integer("limit", limit, 1000)
    if not 1 <= size <= 1000:
        raise BadQuery("limit must be between 1 and 1000")
    cursor = None if after in (None, "") else _integer("after", after, MAX_CURSOR)
    return size, cursor


def _integer(name: str, value: str, largest: int) -> int:
    # ASCII digits only (int() would take "+1", " 1", "1_0" and other scripts' digits).
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > largest:
        raise BadQuery(f"{name} must be an integer from 0 to {largest}" if name == "after"
                       else "limit must be between 1 and 1000")
    return int(value)


class AdminLog:
    """Logs every `/admin/` request of the wrapped app: method, path, status
    and peer (the connection's address), never a header or the query."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/admin/"):
            await self.app(scope, receive, send)
            return
        noted = StatusNoted(send)
        try:
            await self.app(scope, receive, noted)
        finally:
            client = scope.get("client")
            # Escaped: a decoded path may hold newlines or control characters.
            path = scope["path"][:512].encode("unicode_escape").decode("ascii")
            log.info("admin method=%s path=%s status=%d peer=%s", scope["method"], path, noted.status,
                     client[0] if client else "-")
