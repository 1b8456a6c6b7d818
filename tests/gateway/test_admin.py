"""The admin read API, health, readiness and metrics."""

from __future__ import annotations

import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio
TOKEN = {"X-Cohorly-Token": "tok_shop"}


async def _track(client, events: list[tuple[str, str]]) -> None:
    body = [{"event": name, "properties": {"distinct_id": who}} for name, who in events]
    assert (await client.post("/track", headers=TOKEN, json=body)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic adm_test_key"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong-key", "wrong-scheme", "empty"],
)
async def test_admin_needs_an_admin_key(sqlite_backend, headers) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        for path in ("/admin/v1/projects/shop/events", "/admin/v1/projects/shop/profiles/u",
                     "/admin/v1/rejections"):
            reply = await client.get(path, headers=headers)
            assert reply.status_code == 401, path
            assert reply.json() == {"error": "unauthorized"}


async def test_ingestion_credentials_are_not_admin_keys(sqlite_backend) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        reply = await client.get("/admin/v1/projects/shop/events", headers={"Authorization": "Bearer tok_shop"})
        assert reply.status_code == 401


async def test_unknown_project_is_404(sqlite_backend) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        assert (await client.get("/admin/v1/projects/nope/events", headers=ADMIN)).status_code == 404
        assert (await client.get("/admin/v1/projects/nope/profiles/u", headers=ADMIN)).status_code == 404
        assert (await client.get("/admin/v1/rejections?project=nope", headers=ADMIN)).status_code == 404


async def test_events_pages_in_storage_order(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _track(client, [(f"e{i}", "u") for i in range(7)])
        seen: list[str] = []
        after = ""
        pages = 0
        while True:
            page = (await client.get(f"/admin/v1/projects/shop/events?limit=3&after={after}", headers=ADMIN)).json()
            pages += 1
            seen += [e["name"] for e in page["events"]]
            if page["next"] is None:
                break
            after = page["next"]
        assert seen == [f"e{i}" for i in range(7)]
        assert pages == 3
        for bad in ("limit=0", "limit=1001", "limit=x", "after=x"):
            assert (await client.get(f"/admin/v1/projects/shop/events?{bad}", headers=ADMIN)).status_code == 400


async def test_events_filters_and_person_matching(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _track(client, [("view", "anon"), ("buy", "user"), ("view", "other")])
        assert (await client.post("/alias", headers=TOKEN, json={"alias": "anon", "distinct_id": "user"})).status_code == 200
        person = (await client.get("/admin/v1/projects/shop/events?distinct_id=anon", headers=ADMIN)).json()
        # The whole person, each event keeping the id it was sent with.
        assert [(e["name"], e["distinct_id"]) for e in person["events"]] == [("view", "anon"), ("buy", "user")]
        views = (await client.get("/admin/v1/projects/shop/events?name=view", headers=ADMIN)).json()
        assert [e["distinct_id"] for e in views["events"]] == ["anon", "other"]
        none = (await client.get("/admin/v1/projects/shop/events?source=inslytic", headers=ADMIN)).json()
        assert none == {"events": [], "next": None}
        # Another project sees nothing of this one.
        assert (await client.get("/admin/v1/projects/blog/events", headers=ADMIN)).json()["events"] == []


async def test_profile_404_until_touched_and_after_delete(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _track(client, [("view", "u")])
        # Events alone make no profile.
        assert (await client.get("/admin/v1/projects/shop/profiles/u", headers=ADMIN)).status_code == 404
        await client.post("/engage", headers=TOKEN, json={"distinct_id": "u", "$set": {"a": 1}})
        found = (await client.get("/admin/v1/projects/shop/profiles/u", headers=ADMIN)).json()
        assert found == {"distinct_id": "u", "properties": {"a": 1}, "ids": ["u"], "devices": []}
        await client.post("/engage", headers=TOKEN, json={"distinct_id": "u", "$delete": True})
        assert (await client.get("/admin/v1/projects/shop/profiles/u", headers=ADMIN)).status_code == 404
        assert len((await client.get("/admin/v1/projects/shop/events", headers=ADMIN)).json()["events"]) == 1


async def test_health_readiness_and_metrics(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] is True
        body = [{"event": "e", "properties": {"distinct_id": "u", "$insert_id": "same"}}] * 3
        await client.post("/track", headers=TOKEN, json=body)
        await client.post("/track", headers={"X-Cohorly-Token": "bad"}, json=body)
        text = (await client.get("/metrics")).text
        assert 'dialgate_events_received_total{dialect="cohorly",project="shop"} 3' in text
        assert 'dialgate_events_stored_total{dialect="cohorly",project="shop"} 1' in text
        assert 'dialgate_events_deduplicated_total{dialect="cohorly",project="shop"} 2' in text
        assert 'dialgate_rejections_total{dialect="cohorly",reason="unauthorized"} 1' in text
        assert 'dialgate_request_duration_seconds_count{dialect="cohorly"} 2' in text
