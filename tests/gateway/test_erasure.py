"""gateway.erasure: the admin route's refusals, and `dialgate erase` run
for real against both backends (the rows themselves: tests/storage/test_erase.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from gateway.erasure import FORGOTTEN, OUT_OF_REACH
from tests.support import ADMIN, events_of, gateway, profile_of, settings_for

pytestmark = pytest.mark.anyio

DIALGATE = Path(sys.executable).parent / "dialgate"
CLIENT = {"Authorization": "Bearer sk_shop"}


async def test_the_route_needs_the_key_a_known_project_and_a_sane_id(sqlite_backend) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        assert (await client.delete("/admin/v1/projects/shop/people/u1")).status_code == 401
        reply = await client.delete("/admin/v1/projects/nope/people/u1", headers=ADMIN)
        assert reply.status_code == 404 and reply.json() == {"error": "unknown project"}
        reply = await client.delete("/admin/v1/projects/shop/people/" + "x" * 1025, headers=ADMIN)
        assert reply.status_code == 400 and "1 to 1024 bytes" in reply.json()["error"]
        assert (await client.get("/admin/v1/projects/shop/people/u1", headers=ADMIN)).status_code == 405
        # An id with a slash is one id.
        await client.post("/api/client/identify", headers=CLIENT, json={"external_id": "a/b", "data": {"k": 1}})
        reply = await client.delete("/admin/v1/projects/shop/people/a/b", headers=ADMIN)
        assert reply.status_code == 200 and reply.json()["removed"]["profiles"] == 1


async def test_dialgate_erase_prints_the_receipt(backend, tmp_path) -> None:
    settings = settings_for(backend)
    async with gateway(settings) as client:
        await client.post("/api/client/identify", headers=CLIENT, json={"anonymous_id": "anon-9", "external_id": "u9",
                                                                        "data": {"k": 1}})
        await client.post("/api/client/events", headers=CLIENT, json=[{"anonymous_id": "anon-9", "name": "e"}])
    config = tmp_path / "dialgate.toml"
    config.write_text("\n".join([
        "[storage]", f'url = "{backend["storage_url"]}"',
        "[redis]", f'url = "{backend["redis_url"]}"', f'key_prefix = "{backend["redis_prefix"]}"', "",
    ]))
    process = await asyncio.create_subprocess_exec(
        str(DIALGATE), "erase", "--config", str(config), "--project", "shop", "--id", "anon-9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "DIALGATE_CONFIG": ""})
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    receipt = json.loads(out)
    assert receipt["person"] == "u9" and receipt["ids"] == ["anon-9", "u9"]
    assert receipt["removed"] == {"events": 1, "aliases": 1, "profiles": 1, "devices": 0, "rejections": 0}
    assert receipt["dedup_cache"] == (FORGOTTEN if backend["redis_url"] else OUT_OF_REACH)
    # The project is not in this file's configuration: said, and done anyway.
    assert "not in the configuration" in err.decode()
    async with gateway(settings) as client:
        assert await profile_of(client, "u9") is None
        assert await events_of(client) == []
