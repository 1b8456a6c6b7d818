"""The admin read API, health and metrics."""

from __future__ import annotations

import hmac
from typing import Any

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from storage import queries


class Admin:
    def __init__(self, keys: list[str], projects: set[str], state: Any) -> None:
        self._keys = [k.encode() for k in keys]
        self._projects = projects
        self._state = state  # .engine, .redis, .metrics once started

    def routes(self) -> list[Route]:
        return [
            Route("/admin/v1/projects/{project}/events", self.events, methods=["GET"]),
            Route("/admin/v1/projects/{project}/profiles/{id}", self.profile, methods=["GET"]),
            Route("/admin/v1/rejections", self.rejections, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

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
        q = request.query_params
        paging = _paging(q.get("limit"), q.get("after"))
        if isinstance(paging, Response):
            return paging
        items, next_ = await queries.events(
            self._state.engine, project,
            distinct_id=q.get("distinct_id"), name=q.get("name"), source=q.get("source"),
            limit=paging[0], after=paging[1],
        )
        return JSONResponse({"events": items, "next": next_})

    async def profile(self, request: Request) -> Response:
        project = request.path_params["project"]
        if (refused := self._check(request, project)) is not None:
            return refused
        found = await queries.profile(self._state.engine, project, request.path_params["id"])
        if found is None:
            return JSONResponse({"error": "no such profile"}, status_code=404)
        return JSONResponse(found)

    async def rejections(self, request: Request) -> Response:
        q = request.query_params
        project = q.get("project")
        if (refused := self._check(request, project)) is not None:
            return refused
        paging = _paging(q.get("limit"), q.get("after"))
        if isinstance(paging, Response):
            return paging
        items, next_ = await queries.rejections(
            self._state.engine, project=project, source=q.get("source"), reason=q.get("reason"),
            limit=paging[0], after=paging[1],
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
        return PlainTextResponse(self._state.metrics.render(), media_type="text/plain; version=0.0.4")


def _paging(limit: str | None, after: str | None) -> tuple[int, int | None] | Response:
    try:
        size = 100 if limit is None else int(limit)
        cursor = None if after in (None, "") else int(after)
    except ValueError:
        return JSONResponse({"error": "limit and after must be integers"}, status_code=400)
    if not 1 <= size <= 1000:
        return JSONResponse({"error": "limit must be between 1 and 1000"}, status_code=400)
    return size, cursor
