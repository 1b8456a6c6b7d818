from __future__ import annotations

import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio


async def test_track_then_read_back(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track",
            headers={"X-Cohorly-Token": "tok_shop"},
            json=[{"event": "Signed Up", "properties": {"distinct_id": "u1", "$insert_id": "i1", "plan": "pro"}}],
        )
        assert reply.status_code == 200
        assert reply.json() == {"status": 1, "inserted": 1}
        listing = (await client.get("/admin/v1/projects/shop/events", headers=ADMIN)).json()
        assert [e["properties"] for e in listing["events"]] == [{"plan": "pro"}]
        assert listing["events"][0]["source"] == "cohorly"
