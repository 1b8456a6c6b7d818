"""A path two dialects serve (gateway/shared.py): the credential a request
carries picks the dialect; one credential in both dialects' lists is a config
error. The second dialect is the test plug-in, Echo, sharing Cohorly's
/track (as Mixpanel will)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, Settings, from_dict
from gateway.registry import discover
from tests.plugin import echo
from tests.support import ADMIN_KEY, events_of, gateway

pytestmark = pytest.mark.anyio
Echo = echo.module().Echo
TRACK = {"event": "Bought", "properties": {"token": "tok_shop", "distinct_id": "c1", "$insert_id": "c-1"}}


def shared_settings(backend: dict[str, str], projects: list[dict[str, Any]] | None = None) -> Settings:
    raw: dict[str, Any] = {
        "storage": {"url": backend["storage_url"]},
        "redis": {"url": backend["redis_url"], "key_prefix": backend["redis_prefix"]},
        "admin": {"keys": [ADMIN_KEY]},
        "projects": projects or [
            {"name": "shop", "cohorly_tokens": ["tok_shop"], "echo_keys": ["echo_shop"], "echo_label": "mine"},
        ],
        "dialects": {"echo": {"paths": ["/echo", "/track"]}},
    }
    return from_dict(raw, {}, registry=(*discover(), Echo))


async def test_the_credential_picks_the_dialect(backend: dict[str, str]) -> None:
    async with gateway(shared_settings(backend)) as client:
        # Cohorly's token: Cohorly's contract, unchanged.
        cohorly = await client.post("/track", json=TRACK)
        assert (cohorly.status_code, cohorly.json()) == (200, {"status": 1, "inserted": 1})
        # Echo's key: Echo's contract, on the same path.
        mine = await client.post("/track", json={"name": "Echoed", "id": "e1", "insert_id": "e-1"},
                                 headers={"X-Echo-Key": "echo_shop"})
        assert (mine.status_code, mine.json()) == (200, {"echoed": 1, "duplicates": 0})
        again = await client.post("/track", json={"name": "Echoed", "id": "e1", "insert_id": "e-1"},
                                  headers={"X-Echo-Key": "echo_shop"})
        assert again.json() == {"echoed": 0, "duplicates": 1}
        stored = {(e["source"], e["name"], e["distinct_id"]) for e in await events_of(client)}
        assert stored == {("cohorly", "Bought", "c1"), ("echo", "Echoed", "e1")}
        [echoed] = await events_of(client, source="echo")
        assert echoed["properties"] == {"label": "mine"}
        metrics = (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
        assert 'dialgate_events_stored_total{dialect="echo",project="shop"} 1' in metrics
        assert 'dialgate_events_stored_total{dialect="cohorly",project="shop"} 1' in metrics


async def test_no_credential_is_answered_by_the_first_dialect(backend: dict[str, str]) -> None:
    async with gateway(shared_settings(backend)) as client:
        bare = await client.post("/track", json={"event": "x", "properties": {"distinct_id": "u"}})
        assert (bare.status_code, bare.json()) == (401, {"status": 0, "error": "invalid token"})
        # An unknown Echo key picks no dialect either: Cohorly answers, as alone.
        unknown = await client.post("/track", json={"event": "x", "properties": {"distinct_id": "u"}},
                                    headers={"X-Echo-Key": "nope"})
        assert (unknown.status_code, unknown.json()) == (401, {"status": 0, "error": "invalid token"})
        echo_body = await client.post("/track", json={"name": "x", "id": "u"}, headers={"X-Echo-Key": "nope"})
        assert echo_body.status_code == 400 and echo_body.json()["status"] == 0
        assert await events_of(client) == []


async def test_credentials_of_both_dialects_are_invalid_input(backend: dict[str, str]) -> None:
    async with gateway(shared_settings(backend)) as client:
        both = await client.post("/track", json=TRACK, headers={"X-Echo-Key": "echo_shop"})
        assert both.status_code == 400
        assert both.json()["status"] == 0  # the first dialect's shape
        assert "more than one dialect" in both.json()["error"]
        assert await events_of(client) == []


async def test_each_path_keeps_its_own_dialect_and_preflight_allows_both_headers(backend: dict[str, str]) -> None:
    async with gateway(shared_settings(backend)) as client:
        own = await client.post("/echo", json={"name": "n", "id": "u"}, headers={"X-Echo-Key": "echo_shop"})
        assert own.json() == {"echoed": 1, "duplicates": 0}
        engage = await client.post("/engage", json={"token": "tok_shop", "distinct_id": "u", "$set": {"a": 1}})
        assert engage.json() == {"status": 1, "applied": 1}
        preflight = await client.options("/track", headers={"Origin": "https://a.example"})
        allowed = preflight.headers["access-control-allow-headers"]
        assert allowed == "Content-Type, Content-Encoding, Authorization, X-Cohorly-Token, X-Echo-Key"


def test_one_credential_in_both_dialects_of_a_shared_path_is_a_config_error() -> None:
    backend = {"storage_url": "sqlite+aiosqlite:///unused.db", "redis_url": "", "redis_prefix": "x"}
    with pytest.raises(ConfigError) as info:
        shared_settings(backend, [{"name": "shop", "cohorly_tokens": ["same"], "echo_keys": ["same"]}])
    message = str(info.value)
    assert message.startswith("projects[0].")
    assert "cohorly" in message and "echo" in message and "/track" in message
    assert "same" not in message.replace("share", "")  # the credential itself is not echoed
    # Not sharing a path (Echo on /echo only), the same project may use it in both.
    raw = {"projects": [{"name": "shop", "cohorly_tokens": ["same"], "echo_keys": ["same"]}]}
    assert [p.name for p in from_dict(raw, {}, registry=(*discover(), Echo)).projects] == ["shop"]
