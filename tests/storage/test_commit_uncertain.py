"""A connection lost while a commit is in flight: did it commit? The insert
of events outside a block is its own commit, and so is the COMMIT of the
identity/profile transaction: when the connection breaks after the server
ran it, the writer's retry cannot see it. Each attempt therefore inserts
its group's token (`commit_marks`) in the same statement or transaction,
and the retry, the same attempt, meets it as a unique violation when the
first one committed: nothing applied twice (an event without an insert id,
a profile operation such as $add), the request answered as the first time
(storage.postgres)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.engine import make_url

from tests.faults.proxy import TcpProxy
from tests.support import events_of, gateway, props_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}


async def _lost_in_flight(proxy: TcpProxy, client, path: str, body, marker: bytes) -> int:
    """Send the request; once the gateway sends `marker` the server's answer
    is dropped, then every connection is cut (and the proxy restored)."""
    proxy.mute_after = marker
    sent = asyncio.create_task(client.post(path, headers=COHORLY, json=body))
    await asyncio.sleep(0.5)  # the statement ran on the server; its answer went nowhere
    proxy.mute_after = None
    await asyncio.to_thread(proxy.reset)
    return (await sent).status_code


@pytest.mark.parametrize("route", ["events", "profile"])
async def test_postgres_a_commit_lost_in_flight_is_applied_once(postgres_backend, route: str, caplog) -> None:
    url = make_url(postgres_backend["storage_url"])
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = dict(postgres_backend, storage_url=url.set(port=proxy.port).render_as_string(False))
        async with gateway(settings_for(proxied)) as client:
            warm = await client.post("/track", headers=COHORLY,
                                     json=[{"event": "warm", "properties": {"distinct_id": "u"}}])
            assert warm.status_code == 200
            if route == "events":  # no insert id: nothing in the database tells a copy apart
                status = await _lost_in_flight(proxy, client, "/track",
                                               [{"event": "once", "properties": {"distinct_id": "u"}}], b'"once"')
                assert status == 200
                assert len(await events_of(client, name="once")) == 1
            else:
                await client.post("/engage", headers=COHORLY, json={"$distinct_id": "p", "$set": {"n": 0}})
                status = await _lost_in_flight(proxy, client, "/engage",
                                               {"$distinct_id": "p", "$add": {"n": 1}}, b"COMMIT")
                assert status == 200
                assert (await props_of(client, "p") or {}).get("n") == 1
    # The retry met the first attempt's commit mark (not a commit that never happened).
    assert "the commit whose answer was lost had happened" in caplog.text
