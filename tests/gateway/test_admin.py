"""The admin read API, health, readiness and metrics."""

from __future__ import annotations

import logging
import sqlite3

import httpx
import pytest

from gateway.app import build_app
from gateway.model import GroupUpdate
from storage.engine import create_engine
from storage.migrate import upgrade
from tests.support import ADMIN, ADMIN_KEY, database_sink, free_port, gateway, group_of, lifespan, settings_for

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
                     "/admin/v1/projects/shop/groups/company/acme", "/admin/v1/rejections"):
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
        unknown = await client.get("/admin/v1/projects/nope/groups/company/acme", headers=ADMIN)
        assert unknown.status_code == 404 and unknown.json() == {"error": "unknown project"}
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
        aliased = await client.post("/alias", headers=TOKEN, json={"alias": "anon", "distinct_id": "user"})
        assert aliased.status_code == 200
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
        assert 'dialgate_request_duration_seconds_count{dialect="cohorly",endpoint="track"} 2.0' in text
        assert text.startswith("# HELP") and "process_cpu_seconds_total" in text


# -- malformed queries, odd ids, faults ------------------------------------------


@pytest.mark.parametrize("query", [
    "after=" + "9" * 40, "after=9223372036854775808", "after=-1", "after=+1", "after=1_0", "after=%D9%A3",
    "limit=" + "1" * 40, "limit= 5", "nmae=x", "name=a&name=b", "name=" + "x" * 1025,
])
async def test_a_malformed_cursor_or_filter_is_a_json_400(backend, query) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ("/admin/v1/projects/shop/events", "/admin/v1/rejections"):
            q = query.replace("name=", "reason=") if path.endswith("rejections") else query
            reply = await client.get(f"{path}?{q}", headers=ADMIN)
            assert reply.status_code == 400, (path, q, reply.text)
            assert reply.json()["error"], reply.text


async def test_the_largest_cursor_and_a_nul_filter_are_answered(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await _track(client, [("a\x00b", "u")])
        top = await client.get(f"/admin/v1/projects/shop/events?after={2**63 - 1}", headers=ADMIN)
        assert top.status_code == 200 and top.json() == {"events": [], "next": None}
        # A NUL reads as U+FFFD, as the writer stored it.
        found = await client.get("/admin/v1/projects/shop/events", params={"name": "a\x00b"}, headers=ADMIN)
        assert [e["name"] for e in found.json()["events"]] == ["a\ufffdb"]


async def test_profile_ids_containing_a_slash_are_readable(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for id_ in ("team/ada", "a/b/c"):
            reply = await client.post("/engage", headers=TOKEN, json={"distinct_id": id_, "$set": {"who": id_}})
            assert reply.status_code == 200
        for path in ("team/ada", "team%2Fada", "a/b/c"):
            found = await client.get(f"/admin/v1/projects/shop/profiles/{path}", headers=ADMIN)
            assert found.status_code == 200, (path, found.text)
            assert found.json()["properties"]["who"] == path.replace("%2F", "/")


async def _groups(backend: dict[str, str], *updates: GroupUpdate) -> None:
    """Write group updates through a sink of the gateway's database (the
    Mixpanel dialect's records, without the dialect)."""
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine)
    sink.start()
    try:
        written = await sink.submit(list(updates))
        assert written.applied == len(updates)
    finally:
        await sink.close()
        await engine.dispose()


def _group(key: str, id_: str, project: str = "shop", **verbs: object) -> GroupUpdate:
    return GroupUpdate(project=project, source="mixpanel", group_key=key, group_id=id_, time=1,
                       **verbs)  # type: ignore[arg-type]


async def test_a_group_profile_is_read_by_key_and_id_404_when_none_or_deleted(backend) -> None:
    await _groups(backend, _group("company", "acme", set={"name": "Acme"}, union={"tags": ["b2b"]}),
                  _group("company", "team/eu 1", set={"who": "slash"}), _group("team", "acme", set={"n": 2}),
                  _group("company", "acme", project="blog", set={"blog": True}))
    async with gateway(settings_for(backend)) as client:
        assert await group_of(client, "company", "acme") == {
            "group_key": "company", "group_id": "acme", "properties": {"name": "Acme", "tags": ["b2b"]},
        }
        assert (await group_of(client, "team", "acme") or {}).get("properties") == {"n": 2}
        assert (await group_of(client, "company", "acme", project="blog") or {}).get("properties") == {"blog": True}
        # A group id may contain "/" (sent as is or encoded); the key is one segment.
        for path in ("team/eu 1", "team%2Feu%201"):
            found = await client.get(f"/admin/v1/projects/shop/groups/company/{path}", headers=ADMIN)
            assert found.status_code == 200 and found.json()["group_id"] == "team/eu 1", (path, found.text)
        # None of that name; a group is no person and a person no group.
        assert await group_of(client, "company", "nobody") is None
        assert await group_of(client, "nope", "acme") is None
        assert (await client.get("/admin/v1/projects/shop/profiles/acme", headers=ADMIN)).status_code == 404
        # Ids past 1,024 bytes are a malformed query.
        for path in (f"company/{'x' * 1025}", f"{'k' * 1025}/acme"):
            long = await client.get(f"/admin/v1/projects/shop/groups/{path}", headers=ADMIN)
            assert long.status_code == 400 and "longer than 1024 bytes" in long.json()["error"]
    await _groups(backend, _group("company", "acme", delete=True))
    async with gateway(settings_for(backend)) as client:
        assert await group_of(client, "company", "acme") is None
        assert await group_of(client, "team", "acme") is not None


async def test_database_unavailable_is_a_json_503_with_retry_after(postgres_backend) -> None:
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = settings_for(dict(postgres_backend, storage_url=dead),
                            storage={"migrate_on_start": False, "unavailable_retry_after": 9})
    async with gateway(settings) as client:
        for path in ("/admin/v1/projects/shop/events", "/admin/v1/projects/shop/profiles/u",
                     "/admin/v1/projects/shop/groups/company/acme", "/admin/v1/rejections"):
            reply = await client.get(path, headers=ADMIN)
            assert reply.status_code == 503, (path, reply.text)
            assert reply.headers["retry-after"] == "9"
            assert reply.json() == {"error": "database unavailable"}


async def test_an_unexpected_error_is_a_json_500_not_an_empty_one(sqlite_backend, caplog) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        await _track(client, [("e", "u")])
        # A row the admin API cannot decode (not valid JSON in a JSON column).
        db = sqlite_backend["storage_url"].removeprefix("sqlite+aiosqlite:///")
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE events SET properties = '{broken'")
        reply = await client.get("/admin/v1/projects/shop/events", headers=ADMIN)
        assert reply.status_code == 500
        assert reply.json() == {"error": "internal error"}
        assert any("admin /admin/v1/projects/shop/events failed" in r.getMessage() for r in caplog.records)


async def test_admin_requests_are_logged_without_the_key(sqlite_backend, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dialgate")
    async with gateway(settings_for(sqlite_backend)) as client:
        await client.get("/admin/v1/projects/shop/events?name=x", headers=ADMIN)
        await client.get("/admin/v1/rejections", headers={"Authorization": "Bearer not-the-key"})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin ")]
    assert "admin method=GET path=/admin/v1/projects/shop/events status=200 peer=127.0.0.1" in lines, lines
    assert "admin method=GET path=/admin/v1/rejections status=401 peer=127.0.0.1" in lines, lines
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ADMIN_KEY not in text and "not-the-key" not in text


async def test_with_admin_bind_the_public_app_serves_no_admin_path(sqlite_backend) -> None:
    settings = settings_for(sqlite_backend, admin={"bind": f"127.0.0.1:{free_port()}"})
    app = build_app(settings)
    async with lifespan(app):
        public = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://public")
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.admin), base_url="http://admin")
        async with public, admin:
            for path in ("/admin/v1/projects/shop/events", "/admin/v1/rejections", "/metrics", "/readyz"):
                assert (await public.get(path, headers=ADMIN)).status_code == 404, path
                assert (await admin.get(path, headers=ADMIN)).status_code == 200, path
            # /healthz on both (a load balancer's check); ingestion on the public one only.
            assert (await public.get("/healthz")).status_code == 200
            assert (await admin.get("/healthz")).status_code == 200
            track = {"event": "e", "properties": {"distinct_id": "u"}}
            assert (await public.post("/track", headers=TOKEN, json=track)).status_code == 200
            assert (await admin.post("/track", headers=TOKEN, json=track)).status_code == 404
            assert len((await admin.get("/admin/v1/projects/shop/events", headers=ADMIN)).json()["events"]) == 1
