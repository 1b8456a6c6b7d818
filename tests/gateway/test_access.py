"""gateway.access: one line per request with `[logging] access_log`."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest

from gateway.access import AccessLog
from gateway.app import build_app
from gateway.logs import ACCESS
from tests.support import ADMIN, free_port, gateway, lifespan, settings_for

pytestmark = pytest.mark.anyio

SHOP = {"X-Cohorly-Token": "tok_shop"}
EVENT = {"event": "e", "properties": {"distinct_id": "u"}}
LINE = re.compile(r"request method=(\S+) path=(\S+) status=(\d+) duration_ms=(\d+\.\d\d) peer=(\S+)")


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int, str]]:
    found = []
    for record in caplog.records:
        if record.name == ACCESS:
            match = LINE.fullmatch(record.getMessage())
            assert match is not None, record.getMessage()
            method, path, status, _, peer = match.groups()
            found.append((method, path, int(status), peer))
    return found


async def test_every_request_once_without_its_query(sqlite_backend: dict[str, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    settings = settings_for(sqlite_backend, logging={"access_log": True})
    async with gateway(settings, client_ip="203.0.113.9") as client:
        await client.post("/track?token=tok_shop&verbose=1", headers=SHOP, json=EVENT)
        await client.post("/track/", headers={"X-Cohorly-Token": "tok_nope"}, json=EVENT)
        await client.delete("/track")  # Dispatch's own 405
        await client.get("/admin/v1/rejections", headers=ADMIN, params={"limit": "5"})
        await client.get("/no%0Awhere")
    assert _lines(caplog) == [
        ("POST", "/track", 200, "203.0.113.9"),
        ("POST", "/track/", 401, "203.0.113.9"),
        ("DELETE", "/track", 405, "203.0.113.9"),
        ("GET", "/admin/v1/rejections", 200, "203.0.113.9"),
        ("GET", "/no\\nwhere", 404, "203.0.113.9"),  # escaped: a path cannot break the line
    ]
    assert all("tok_" not in r.getMessage() for r in caplog.records)


async def test_none_without_access_log(sqlite_backend: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    async with gateway(settings_for(sqlite_backend)) as client:
        assert (await client.post("/track", headers=SHOP, json=EVENT)).status_code == 200
    assert _lines(caplog) == []


async def test_the_admin_listener_is_logged_too(sqlite_backend: dict[str, str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    settings = settings_for(sqlite_backend, logging={"access_log": True}, admin={"bind": f"127.0.0.1:{free_port()}"})
    app = build_app(settings)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app.admin, client=("192.0.2.4", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
            assert (await admin.get("/readyz")).status_code == 200
    assert _lines(caplog) == [("GET", "/readyz", 200, "192.0.2.4")]


async def test_an_app_that_fails_before_answering_is_logged_as_500(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)

    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await AccessLog(broken)({"type": "http", "method": "GET", "path": "/x", "client": None}, None, None)
    assert _lines(caplog) == [("GET", "/x", 500, "-")]
