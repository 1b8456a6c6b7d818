"""Erasure on both backends: a person known through five dialects' ids
leaves no row that names any of them, others' rows stay, and what comes
after starts a new person."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from sqlalchemy import select

from gateway.erasure import FORGOTTEN, LOCAL_ONLY
from storage import tables
from storage.engine import create_engine
from tests.support import ADMIN, events_of, gateway, profile_of, props_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}
CLIENT = {"Authorization": "Bearer sk_shop"}
INSLYTIC = {"Authorization": "Bearer ins_shop"}
COLLECT = "tc_s=1234&token=src_shop"
DEVICE = {"os": "ios", "model": "x", "app_build": "1", "app_version": "1.0"}
# Ids of the person, and of another person who must be left alone.
IDS = ("anon-c", "anon-k", "anon-i", "anon-t", "user-42")
OTHER = "someone-else"


async def _ok(reply: Any, status: int) -> None:
    assert reply.status_code == status, reply.text


async def _person(client: Any) -> None:
    """user-42 through Cohorly (aliased), the client API, Inslytic, Mixpanel
    and collect, and a quarantined collect record naming two of its ids."""
    await _ok(await client.post("/track", headers=COHORLY, json=[
        {"event": "c-ev", "properties": {"distinct_id": "anon-c", "$insert_id": "c-1"}}]), 200)
    await _ok(await client.post("/engage", headers=COHORLY, json={"distinct_id": "anon-c", "$set": {"seen": 1}}), 200)
    await _ok(await client.post("/alias", headers=COHORLY, json={"alias": "anon-c", "distinct_id": "user-42"}), 200)
    await _ok(await client.post("/api/client/identify", headers=CLIENT, json={
        "anonymous_id": "anon-k", "external_id": "user-42", "data": {"plan": "pro"}}), 204)
    await _ok(await client.post("/api/client/devices", headers=CLIENT, json={
        "external_id": "user-42", "device_id": "dev-42", **DEVICE}), 204)
    await _ok(await client.post("/api/client/events", headers=CLIENT, json=[{"external_id": "user-42",
                                                                           "name": "k-ev"}]), 204)
    await _ok(await client.post("/v1/ingest", headers=INSLYTIC, json={"events": [{
        "eventName": "i-ev", "timestamp": "2026-12-01T10:00:00Z", "anonymousId": "anon-i", "userId": "user-42",
        "sessionId": "s", "consentGiven": True}]}), 202)
    await _ok(await client.post("/track", json=[{"event": "m-ev", "properties": {
        "token": "mp_shop", "distinct_id": "user-42", "$insert_id": "m-1"}}]), 200)
    user = {"id": "user-42", "consistent_anonymous_id": "anon-t"}
    await _ok(await client.post(f"/events/batch?{COLLECT}", json={"batch": [
        {"event_name": "t-ev", "user": user, "context": {"event_id": "t-1"}}, {"user": user}]}), 200)


async def _other(client: Any) -> None:
    await _ok(await client.post("/track", headers=COHORLY, json=[
        {"event": "o-ev", "properties": {"distinct_id": OTHER, "$insert_id": "o-1"}}]), 200)
    await _ok(await client.post("/api/client/identify", headers=CLIENT, json={
        "anonymous_id": "o-anon", "external_id": OTHER, "data": {"plan": "basic"}}), 204)


async def _rows_naming(engine: Any, ids: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of every table in which any column's text names an id."""
    found = []
    async with engine.connect() as conn:
        for table in tables.metadata.sorted_tables:
            for row in (await conn.execute(select(table))).mappings():
                text = msgspec.json.encode(dict(row)).decode()
                if any(id_ in text or msgspec.json.encode(id_).decode()[1:-1] in text for id_ in ids):
                    found.append((table.name, dict(row)))
    return found


async def test_erasure_leaves_no_row_naming_any_id_and_later_events_start_a_new_person(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _person(client)
        await _other(client)
        engine = create_engine(backend["storage_url"])
        before = await _rows_naming(engine, IDS)
        assert {name for name, _ in before} == {"events", "aliases", "profiles", "devices", "rejections"}

        reply = await client.delete("/admin/v1/projects/shop/people/anon-c", headers=ADMIN)
        assert reply.status_code == 200, reply.text
        receipt = reply.json()
        assert receipt["person"] == "user-42" and receipt["id"] == "anon-c"
        assert receipt["ids"] == sorted(IDS)
        assert receipt["removed"] == {"events": 5, "aliases": 4, "profiles": 1, "devices": 1, "rejections": 1}
        assert receipt["dedup_cache"] == (FORGOTTEN if backend["redis_url"] else LOCAL_ONLY)

        assert await _rows_naming(engine, IDS) == []
        # The other person is whole.
        assert [e["name"] for e in await events_of(client, distinct_id=OTHER)] == ["o-ev"]
        assert await props_of(client, "o-anon") == {"plan": "basic"}

        # Afterwards: a new person, with nothing of the old one.
        assert await profile_of(client, "anon-c") is None
        await _ok(await client.post("/api/client/identify", headers=CLIENT, json={
            "external_id": "user-42", "data": {"plan": "free"}}), 204)
        assert await props_of(client, "user-42") == {"plan": "free"}
        assert await profile_of(client, "anon-k") is None  # the old link is gone
        # A copy of an erased event sent again is stored again: the dedup
        # cache forgot its insert id, as the database did.
        await _ok(await client.post("/track", headers=COHORLY, json=[
            {"event": "c-ev", "properties": {"distinct_id": "anon-c", "$insert_id": "c-1"}}]), 200)
        assert [e["name"] for e in await events_of(client, distinct_id="anon-c")] == ["c-ev"]
        await engine.dispose()


async def test_erasing_an_unknown_id_removes_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _other(client)
        reply = await client.delete("/admin/v1/projects/shop/people/nobody", headers=ADMIN)
        assert reply.status_code == 200, reply.text
        assert reply.json()["removed"] == {"events": 0, "aliases": 0, "profiles": 0, "devices": 0, "rejections": 0}
        assert reply.json()["ids"] == ["nobody"]
        assert [e["name"] for e in await events_of(client, distinct_id=OTHER)] == ["o-ev"]
