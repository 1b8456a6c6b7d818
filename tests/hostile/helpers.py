"""Shared by the hostile-input tests: endpoints, credentials, statuses, shapes."""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx

from tests.support import ADMIN, settings_for

# No rate limit gets in the way of hundreds of requests from one IP.
UNLIMITED = {
    "cohorly": {"rate_limit": {"requests": 10_000_000, "per_seconds": 1}},
    "inslytic": {"events_per_minute": 1_000_000_000},
}

KB = 1024
MB = 1024 * 1024

# dialect -> (paths, headers, query, documented statuses)
COHORLY_HEADERS = {"X-Cohorly-Token": "tok_shop"}
CLIENT_HEADERS = {"Authorization": "Bearer pk_shop"}
INSLYTIC_HEADERS = {"Authorization": "Bearer ins_shop"}
COLLECT_QUERY = {"tc_s": "1234", "token": "src_shop"}

STATUSES = {
    "cohorly": {200, 400, 401, 413, 429},
    "client": {204, 400, 401, 413, 422, 429},
    "inslytic": {202, 400, 401, 413, 429},
    "collect": {200, 400},
}
SUCCESS = {"cohorly": 200, "client": 204, "inslytic": 202, "collect": 200}

ENDPOINTS: dict[str, list[str]] = {
    "cohorly": ["/track", "/engage", "/alias"],
    "client": ["/api/client/alias", "/api/client/identify", "/api/client/devices", "/api/client/events"],
    "inslytic": ["/v1/ingest"],
    "collect": ["/events", "/events/batch"],
}


def settings(backend: dict[str, str], **sections: Any) -> Any:
    """Unlimited dialects, with a test's own `dialects` tables merged in."""
    dialects = {name: dict(table) for name, table in UNLIMITED.items()}
    for name, table in sections.pop("dialects", {}).items():
        dialects[name] = {**dialects.get(name, {}), **table}
    return settings_for(backend, dialects=dialects, **sections)


def request_args(dialect: str) -> dict[str, Any]:
    if dialect == "cohorly":
        return {"headers": dict(COHORLY_HEADERS)}
    if dialect == "client":
        return {"headers": dict(CLIENT_HEADERS)}
    if dialect == "inslytic":
        return {"headers": dict(INSLYTIC_HEADERS)}
    return {"params": dict(COLLECT_QUERY), "headers": {}}


def dialect_of(path: str) -> str:
    for dialect, paths in ENDPOINTS.items():
        if path in paths:
            return dialect
    raise KeyError(path)


def check_shape(dialect: str, reply: httpx.Response) -> None:
    """The reply's status is documented, and errors have the dialect's shape."""
    status = reply.status_code
    assert status < 500, (status, reply.text[:500])
    assert status in STATUSES[dialect], (status, reply.text[:500])
    if status == SUCCESS[dialect]:
        if dialect == "client":
            assert reply.content == b""
        return
    body = reply.json()
    assert type(body) is dict, body
    if dialect == "cohorly":
        assert body.get("status") == 0 and type(body.get("error")) is str and body["error"], body
    elif dialect == "client":
        assert body.get("status") == "error" and type(body.get("error")) is str, body
        if status == 401:
            assert body == {"status": "error", "error": "Authorization error.", "code": 1000}
        else:
            assert type(body.get("details")) is list and body["details"], body
            assert all(type(d) is str for d in body["details"]), body
    elif dialect == "inslytic":
        assert type(body.get("error")) is str, body
        if status == 400:
            assert body["error"] == "Validation failed", body
            assert type(body.get("details")) is list and body["details"], body
            assert all(type(d) is str for d in body["details"]), body
    else:
        assert set(body) == {"error"} and type(body["error"]) is str, body


async def count_events(client: httpx.AsyncClient, project: str = "shop") -> int:
    """Every stored event of the project, paging through the admin API."""
    total, after = 0, None
    while True:
        params = {"limit": "1000"}
        if after is not None:
            params["after"] = str(after)
        reply = await client.get(f"/admin/v1/projects/{project}/events", headers=ADMIN, params=params)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        total += len(data["events"])
        after = data.get("next")
        if not after:
            return total


async def profile_exists(client: httpx.AsyncClient, id_: str, project: str = "shop") -> bool:
    quoted = urllib.parse.quote(id_, safe="")
    reply = await client.get(f"/admin/v1/projects/{project}/profiles/{quoted}", headers=ADMIN)
    assert reply.status_code in (200, 404), (reply.status_code, reply.text[:300])
    return reply.status_code == 200


ID_KEYS = ("distinct_id", "$distinct_id", "alias", "anonymous_id", "external_id", "anonymousId", "userId",
           "id", "consistent_anonymous_id")


def ids_in(value: Any, depth: int = 0) -> set[str]:
    """Candidate person ids in a payload (string values of id-like keys), URL-safe ones only."""
    found: set[str] = set()
    if depth > 6:
        return found
    if type(value) is dict:
        for key, item in value.items():
            if key in ID_KEYS and type(item) is str and item and item.isprintable() and "/" not in item \
                    and "\x00" not in item and len(item) < 200 and item not in (".", ".."):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    continue
                found.add(item)
            found |= ids_in(item, depth + 1)
    elif type(value) is list:
        for item in value[:20]:
            found |= ids_in(item, depth + 1)
    return found
