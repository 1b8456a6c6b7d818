"""A database connection the server closed, or a network cut, is "unavailable"
(503 with Retry-After, or a 2xx after one retry on a fresh connection),
never "refused data" (a 4xx, which SDKs drop): on every dialect's event path
and on the identity and profile path, through real HTTP on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.faults.proxy import TcpProxy
from tests.support import events_of, gateway, profile_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}
CLIENT = {"Authorization": "Bearer pk_shop"}
INSLYTIC = {"Authorization": "Bearer ins_shop"}


def _requests(tag: str) -> list[tuple[str, str, dict[str, str], Any]]:
    """(what, path, headers, body): each dialect's event write, and the identity
    and profile writes; `tag` keeps each round's names apart."""
    stamp = "2026-12-06T10:00:00Z"
    return [
        ("cohorly track", "/track", COHORLY,
         [{"event": f"ct-{tag}", "properties": {"distinct_id": "u1", "$insert_id": f"ct-{tag}"}}]),
        ("inslytic ingest", "/v1/ingest", INSLYTIC,
         {"events": [{"eventName": f"in-{tag}", "timestamp": stamp, "anonymousId": "a1", "sessionId": "s",
                      "consentGiven": True}]}),
        ("client events", "/api/client/events", CLIENT, [{"name": f"cl-{tag}", "anonymous_id": "a1"}]),
        ("collect batch", "/events/batch?tc_s=1234&token=src_shop", {},
         {"batch": [{"event_name": f"co-{tag}", "context": {"event_id": f"co-{tag}"}}]}),
        ("cohorly engage", "/engage", COHORLY, {"$distinct_id": f"p-{tag}", "$add": {"n": 1}}),
        ("cohorly alias", "/alias", COHORLY, {"alias": f"anon-{tag}", "distinct_id": f"p-{tag}"}),
        ("client identify", "/api/client/identify", CLIENT,
         {"anonymous_id": f"ia-{tag}", "external_id": f"ie-{tag}", "email": "e@example.com"}),
        ("client devices", "/api/client/devices", CLIENT,
         {"device_id": f"dev-{tag}", "os": "ios", "model": "m", "app_build": "1", "app_version": "1",
          "external_id": f"ie-{tag}"}),
    ]


async def _send_until_stored(client: httpx.AsyncClient, path: str, headers: dict[str, str], body: Any,
                             what: str, attempts: int = 20) -> list[int]:
    """Send as an SDK does: again after a 503 (honouring Retry-After, shortened),
    never after a 4xx. Every answer must be a 2xx or a 503 with Retry-After."""
    statuses = []
    for _ in range(attempts):
        reply = await client.post(path, headers=headers, json=body)
        statuses.append(reply.status_code)
        assert reply.status_code < 300 or reply.status_code == 503, (what, reply.status_code, reply.text)
        if reply.status_code < 300:
            return statuses
        assert reply.headers.get("retry-after", "").isdigit(), (what, reply.headers)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: never stored: {statuses}")


async def _check_stored_once(client: httpx.AsyncClient, tag: str) -> None:
    for prefix in ("ct", "in", "cl", "co"):
        found = await events_of(client, name=f"{prefix}-{tag}")
        assert len(found) == 1, (prefix, tag, found)
    person = await profile_of(client, f"p-{tag}")
    assert person is not None and person["properties"] == {"n": 1}, person
    assert f"anon-{tag}" in person["ids"], person
    identified = await profile_of(client, f"ie-{tag}")
    assert identified is not None and identified["properties"].get("$email") == "e@example.com", identified
    assert [d["device_id"] for d in identified["devices"]] == [f"dev-{tag}"], identified
    assert f"ia-{tag}" in identified["ids"], identified


async def _terminate(storage_url: str) -> int:
    """pg_terminate_backend on every connection the gateway holds, as a
    restart, a failover or an operator does."""
    url = make_url(storage_url)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'dialgate') AS t"))
    finally:
        await conn.close()


async def test_postgres_connections_terminated_before_each_kind_of_write(postgres_backend) -> None:
    async with gateway(settings_for(postgres_backend)) as client:
        for what, path, headers, body in _requests("warm"):
            await _send_until_stored(client, path, headers, body, what)
        terminated = 0
        first_answers = {}
        for what, path, headers, body in _requests("after"):
            terminated += await _terminate(postgres_backend["storage_url"])
            first_answers[what] = (await _send_until_stored(client, path, headers, body, what))[0]
        assert terminated >= len(first_answers), terminated  # every write found its connections gone
        # One retry on a fresh connection: the first answer is already a 2xx.
        assert all(status < 300 for status in first_answers.values()), first_answers
        await _check_stored_once(client, "warm")
        await _check_stored_once(client, "after")


async def test_postgres_network_cut_and_restored(postgres_backend) -> None:
    """Through a TCP proxy the test cuts: while cut, every write is a 503 with
    Retry-After, quickly; once restored, the same gateway stores the SDKs'
    retries exactly once. A cut and restored between two requests costs
    the next one nothing but a fresh connection."""
    url = make_url(postgres_backend["storage_url"])
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = dict(postgres_backend, storage_url=url.set(port=proxy.port).render_as_string(False))
        async with gateway(settings_for(proxied)) as client:
            for what, path, headers, body in _requests("before"):
                await _send_until_stored(client, path, headers, body, what)

            proxy.cut()
            refused = {}
            for what, path, headers, body in _requests("during"):
                started = time.monotonic()
                reply = await client.post(path, headers=headers, json=body)
                refused[what] = (reply.status_code, time.monotonic() - started)
                assert reply.status_code == 503, (what, reply.status_code, reply.text)
                assert reply.headers.get("retry-after", "").isdigit(), (what, reply.headers)
            assert all(took < 5 for _, took in refused.values()), refused
            proxy.restore()
            for what, path, headers, body in _requests("during"):
                await _send_until_stored(client, path, headers, body, what)

            proxy.cut()
            proxy.restore()
            first_answers = {}
            for what, path, headers, body in _requests("after"):
                first_answers[what] = (await _send_until_stored(client, path, headers, body, what))[0]
            assert all(status < 300 for status in first_answers.values()), first_answers
            for tag in ("before", "during", "after"):
                await _check_stored_once(client, tag)
