"""With the database unreachable, nothing is acknowledged: 503 + Retry-After."""

from __future__ import annotations

import pytest

from tests.support import free_port, gateway, settings_for

pytestmark = pytest.mark.anyio


async def test_unreachable_database_gets_503_never_2xx(postgres_backend) -> None:
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = settings_for(
        dict(postgres_backend, storage_url=dead),
        storage={"migrate_on_start": False, "unavailable_retry_after": 7},
    )
    async with gateway(settings) as client:
        reply = await client.post(
            "/track", headers={"X-Cohorly-Token": "tok_shop"},
            json={"event": "e", "properties": {"distinct_id": "u"}},
        )
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "7"
        assert reply.json()["status"] == 0
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] is False
        assert (await client.get("/healthz")).status_code == 200
