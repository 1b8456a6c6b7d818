"""gateway.app: one app per settings (resources in its lifespan), and its
routing: exact ingestion paths with or without a trailing slash and never a
redirect, 404 for what is not routed, 405 naming what is allowed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.app import build_app
from tests.support import ADMIN, PROJECTS, free_port, gateway, lifespan, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}
EVENT = {"event": "e", "properties": {"distinct_id": "u"}}


def _allowed(reply: httpx.Response) -> set[str]:
    return {m.strip() for m in reply.headers["allow"].split(",")}


async def test_a_trailing_slash_is_the_same_route_without_a_redirect(sqlite_backend: dict[str, str]) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        for path in ("/track", "/track/", "/track//"):
            reply = await client.post(path, headers=COHORLY, json=EVENT)
            assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": 1}), path
        for path, status in (("/health/", 200), ("/healthz/", 200), ("/api/client/events/", 405)):
            reply = await client.get(path)
            assert reply.status_code == status, path
            assert "location" not in reply.headers
        reply = await client.get("/admin/v1/projects/shop/events/", headers=ADMIN)
        assert reply.status_code == 200 and len(reply.json()["events"]) == 3


UNROUTED = ["/", "/nothing", "/track/extra", "/TRACK", "/v1", "/api/client", "/admin/v1"]


@pytest.mark.parametrize("path", UNROUTED)
async def test_what_is_not_routed_is_404(sqlite_backend: dict[str, str], path: str) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        for method in ("GET", "POST"):
            reply = await client.request(method, path, headers=COHORLY, json=EVENT)
            assert reply.status_code == 404, (method, path, reply.text)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    # GET /track: Mixpanel's (it shares the path with Cohorly).
    ("PATCH", "/track", {"GET", "POST", "OPTIONS"}),
    ("PUT", "/track/", {"GET", "POST", "OPTIONS"}),
    ("DELETE", "/api/client/events", {"POST", "OPTIONS"}),
    ("POST", "/health", {"GET", "OPTIONS"}),
    ("PATCH", "/events", {"GET", "POST", "OPTIONS"}),
])
async def test_a_method_a_route_does_not_take_is_405_with_allow(
    sqlite_backend: dict[str, str], method: str, path: str, allowed: set[str]
) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        reply = await client.request(method, path, headers=COHORLY)
        assert reply.status_code == 405
        assert _allowed(reply) == allowed
        assert reply.text == "Method Not Allowed"
        assert reply.headers["content-length"] == str(len(reply.content))
        # Every method it allows is routed to it (OPTIONS: the preflight).
        assert (await client.options(path)).status_code == 204


async def test_a_shared_path_is_left_to_the_dialects_some_project_has_credentials_of(
    sqlite_backend: dict[str, str]
) -> None:
    """A dialect no project has a credential of stays off the paths it
    shares: there they keep the other dialect's contract exactly (a method
    it does not serve is its 405), while the paths it serves alone stay."""
    alone = [{k: v for k, v in p.items() if not k.startswith("mixpanel")} for p in PROJECTS]
    async with gateway(settings_for(sqlite_backend, projects=alone)) as client:
        reply = await client.get("/track", params={"data": "e30="})
        assert reply.status_code == 405 and _allowed(reply) == {"POST", "OPTIONS"}
        assert (await client.post("/track", json=EVENT, headers=COHORLY)).json() == {"status": 1, "inserted": 1}
        assert (await client.post("/import", content=b"[]")).status_code in (400, 401)  # served, refused
    async with gateway(settings_for(sqlite_backend)) as client:
        assert (await client.get("/track", params={"data": "e30="})).status_code != 405


async def test_each_app_has_its_own_resources(sqlite_backend: dict[str, str], tmp_path: Any) -> None:
    other = dict(sqlite_backend, storage_url=f"sqlite+aiosqlite:///{tmp_path}/other.db")
    async with gateway(settings_for(sqlite_backend)) as one, gateway(settings_for(other)) as two:
        assert (await one.post("/track", headers=COHORLY, json=EVENT)).status_code == 200
        assert len((await one.get("/admin/v1/projects/shop/events", headers=ADMIN)).json()["events"]) == 1
        assert (await two.get("/admin/v1/projects/shop/events", headers=ADMIN)).json()["events"] == []
        assert "dialgate_events_received_total{" in (await one.get("/metrics")).text
        assert "dialgate_events_received_total{" not in (await two.get("/metrics")).text


async def test_with_admin_bind_the_admin_app_serves_no_ingestion_path(sqlite_backend: dict[str, str]) -> None:
    settings = settings_for(sqlite_backend, admin={"bind": f"127.0.0.1:{free_port()}"})
    app = build_app(settings)
    async with lifespan(app):  # the public app's lifespan starts the admin app's resources
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.admin), base_url="http://admin")
        public = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        async with admin, public:
            assert (await public.post("/track", headers=COHORLY, json=EVENT)).status_code == 200
            assert (await admin.post("/track", headers=COHORLY, json=EVENT)).status_code == 404
            events = (await admin.get("/admin/v1/projects/shop/events/", headers=ADMIN)).json()["events"]
            assert [e["name"] for e in events] == ["e"]
            assert (await admin.get("/metrics")).status_code == 200
            assert (await public.get("/metrics")).status_code == 404
