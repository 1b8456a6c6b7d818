"""`since` / `until` on the admin events endpoint, both backends: half-open
at the millisecond, ISO 8601 or epoch ms, with the other filters and the
cursor; `received_at` beside the client's time."""

from __future__ import annotations

import pytest

from storage.engine import create_engine
from storage.migrate import upgrade
from tests.storage.records import event
from tests.support import ADMIN, database_sink, events_of, gateway, settings_for

pytestmark = pytest.mark.anyio

SINCE, UNTIL = 1_765_000_000_000, 1_765_000_060_000  # 2025-12-06T05:46:40Z, a minute later


async def _stored(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine)
    sink.start()
    times = [SINCE - 1, SINCE, SINCE + 1, UNTIL - 1, UNTIL, UNTIL + 1]
    await sink.submit([event(i, time=t, name=f"e{i % 2}", received_at=t + 5) for i, t in enumerate(times)])
    await sink.close()
    await engine.dispose()


async def test_since_and_until_at_their_edges(backend) -> None:
    await _stored(backend)
    async with gateway(settings_for(backend)) as client:
        async def times(**params: str) -> list[int]:
            return [e["time"] for e in await events_of(client, **params)]

        assert await times(since=str(SINCE), until=str(UNTIL)) == [SINCE, SINCE + 1, UNTIL - 1]
        assert await times(since="2025-12-06T05:46:40Z", until="2025-12-06T05:47:40Z") == [
            SINCE, SINCE + 1, UNTIL - 1]
        assert await times(since="2025-12-06T06:46:40.001+01:00") == [SINCE + 1, UNTIL - 1, UNTIL, UNTIL + 1]
        assert await times(until=str(SINCE + 1)) == [SINCE - 1, SINCE]
        # With the other filters, and page by page.
        assert await times(since=str(SINCE), until=str(UNTIL), name="e1") == [SINCE, UNTIL - 1]
        first = (await client.get("/admin/v1/projects/shop/events", headers=ADMIN,
                                  params={"since": str(SINCE), "limit": "2"})).json()
        assert [e["time"] for e in first["events"]] == [SINCE, SINCE + 1]
        rest = await times(since=str(SINCE), after=first["next"])
        assert rest == [UNTIL - 1, UNTIL, UNTIL + 1]
        # The receipt time is kept beside the client's.
        assert all(e["received_at"] == e["time"] + 5 for e in await events_of(client))


@pytest.mark.parametrize(("query", "message"), [
    ("since=soon", "since must be epoch milliseconds or an ISO 8601 date or date-time, not 'soon'"),
    ("until=1.5", "until must be epoch milliseconds"),
    ("since=10&until=10", "until must be after since (the range is [since, until))"),
    ("since=1&since=2", "parameter 'since' given more than once"),
    ("since=99999999999999999999", "since is out of range"),
])
async def test_bad_times_are_400(sqlite_backend, query: str, message: str) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        reply = await client.get(f"/admin/v1/projects/shop/events?{query}", headers=ADMIN)
        assert reply.status_code == 400
        assert message in reply.json()["error"]
