"""What the Mixpanel dialect's records become in storage, through real HTTP
and the admin API, both backends: group profiles from `/groups`, and the
identity operations (`$identify`, `$create_alias`, `$merge`) as links that
make a person's events from Mixpanel and from Cohorly meet in one profile."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from tests.support import ADMIN, events_of, gateway, group_of, profile_of, rejections_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}


async def _groups(client: httpx.AsyncClient, *updates: dict[str, Any]) -> None:
    """As the SDKs send them: form `data=`, base64 of a JSON array."""
    items = [{"$token": "mp_shop", "$group_key": "company", "$group_id": "acme", **u} for u in updates]
    data = base64.b64encode(json.dumps(items).encode()).decode()
    reply = await client.post("/groups", data={"data": data, "verbose": "1"})
    assert reply.status_code == 200 and reply.json() == {"status": 1, "error": None}, reply.text


async def _track(client: httpx.AsyncClient, *events: tuple[str, dict[str, Any]]) -> None:
    items = [{"event": name, "properties": {"token": "mp_shop", "time": 1_700_000_000.5, **props}}
             for name, props in events]
    reply = await client.post("/track", data={"data": json.dumps(items)})
    assert reply.status_code == 200 and reply.text == "1", reply.text


async def test_group_profiles_from_groups_every_verb_and_delete(backend) -> None:
    async with gateway(settings_for(backend, storage={"max_profile_bytes": 4_000})) as client:
        await _groups(
            client,
            {"$set": {"name": "Acme", "plan": "free"}},
            {"$set_once": {"name": "ignored", "founded": 1999}},
            {"$union": {"tags": ["b2b", "eu"]}},
            {"$remove": {"tags": "b2b"}},
            {"$unset": ["plan"]},
            {"$group_key": "team", "$set": {"n": 1}},
        )
        assert await group_of(client, "company", "acme") == {
            "group_key": "company", "group_id": "acme",
            "properties": {"name": "Acme", "founded": 1999, "tags": ["eu"]},
        }
        # A group is no person: no profile of that id.
        assert await profile_of(client, "acme") is None
        # Past the size cap: not applied, quarantined, the request still succeeds.
        await _groups(client, {"$set": {"big": "x" * 5_000}})
        assert (await group_of(client, "company", "acme") or {})["properties"] == {
            "name": "Acme", "founded": 1999, "tags": ["eu"],
        }
        (refused,) = await rejections_of(client, project="shop", reason="profile_too_large")
        assert refused["source"] == "mixpanel" and refused["detail"].startswith("group company/acme: ")
        # `$delete` deletes whatever its value (the SDKs send "").
        await _groups(client, {"$delete": ""})
        assert await group_of(client, "company", "acme") is None
        assert (await group_of(client, "team", "acme") or {})["properties"] == {"n": 1}
        # A JSON body too.
        reply = await client.post("/groups", json={"$token": "mp_shop", "$group_key": "company",
                                                   "$group_id": "acme", "$set_once": {"again": True}})
        assert reply.status_code == 200, reply.text
        assert (await group_of(client, "company", "acme") or {})["properties"] == {"again": True}


async def test_identify_alias_and_merge_make_one_person_across_dialects(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        # Two visitors, each identified (browser SDK's $identify), one aliased too.
        await _track(
            client,
            ("view", {"distinct_id": "anon-1"}),
            ("$identify", {"distinct_id": "ann", "$identified_id": "ann", "$anon_id": "anon-1"}),
            ("view", {"distinct_id": "anon-2"}),
            ("$identify", {"distinct_id": "bob", "$identified_id": "bob", "$anon_id": "anon-2"}),
            ("$create_alias", {"distinct_id": "bob", "alias": "bob@example.com"}),
        )
        # The same people through Cohorly.
        reply = await client.post("/track", headers=COHORLY,
                                  json=[{"event": "buy", "properties": {"distinct_id": "ann"}}])
        assert reply.status_code == 200
        reply = await client.post("/engage", json={"$token": "mp_shop", "$distinct_id": "anon-1",
                                                   "$set": {"name": "Ann", "plan": "pro"}})
        assert reply.status_code == 200
        reply = await client.post("/engage", headers=COHORLY, json={"distinct_id": "bob@example.com",
                                                                    "$set": {"name": "Bob"}})
        assert reply.status_code == 200
        ann = await profile_of(client, "anon-1")
        assert ann is not None and ann["distinct_id"] == "ann" and ann["ids"] == ["ann", "anon-1"]
        # Identity events are links, not events.
        names = [e["name"] for e in await events_of(client)]
        assert names == ["view", "view", "buy"]
        # A $merge (through /import) joins the two persons, each already linked.
        reply = await client.post("/import", auth=("mps_shop", ""), json=[
            {"event": "$merge", "properties": {"$distinct_ids": ["anon-1", "anon-2"], "time": 1_700_000_001}},
        ])
        assert reply.status_code == 200, reply.text
        for id_ in ("ann", "anon-1", "anon-2", "bob", "bob@example.com"):
            person = await profile_of(client, id_)
            assert person is not None, id_
            # The later ids join the first one's person, which keeps its own properties.
            assert person["distinct_id"] == "ann"
            assert person["ids"] == ["ann", "anon-1", "anon-2", "bob", "bob@example.com"]
            assert person["properties"] == {"name": "Ann", "plan": "pro"}
        every = await events_of(client, distinct_id="bob@example.com")
        assert [(e["name"], e["distinct_id"], e["source"]) for e in every] == [
            ("view", "anon-1", "mixpanel"), ("view", "anon-2", "mixpanel"), ("buy", "ann", "cohorly"),
        ]
        assert await rejections_of(client, project="shop") == []
        # An $identify of an id already someone else's stays a conflict, told to nobody.
        await _track(client, ("$identify", {"distinct_id": "carl", "$identified_id": "carl", "$anon_id": "anon-1"}))
        (conflict,) = await rejections_of(client, project="shop")
        assert conflict["reason"] == "alias_conflict"
        assert (await client.get("/admin/v1/projects/shop/profiles/carl", headers=ADMIN)).status_code == 404
