"""Isolation between projects and the secrecy of credentials, end to end.

Everything goes through the ASGI app and is read back through the admin API:

- a credential of one project never writes into another, in any dialect
  (Cohorly batches mixing per-record tokens included), and identity links
  are per project;
- no ingestion credential reads anything through the admin API, and an
  admin key is matched whole (a prefix or an extension of it is refused);
- no credential, valid or not, is ever written to the logs, to a stored
  event or profile, to the quarantine, or to `repr(settings)`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from tests.support import ADMIN, ADMIN_KEY, PROJECTS, gateway, settings_for

pytestmark = pytest.mark.anyio

TS = "2026-02-16T10:30:00.000Z"
BARRIER = "zz-barrier"
DEVICE = {"token": "45d2e0c7", "os": "iOS", "os_version": "17.2", "model": "iPhone15,2",
          "app_build": "465", "app_version": "1.2.4"}

CREDS: dict[str, dict[str, Any]] = {
    "shop": {"cohorly": "tok_shop", "client": "pk_shop", "inslytic": "ins_shop", "collect": (1234, "src_shop")},
    "blog": {"cohorly": "tok_blog", "client": "pk_blog", "inslytic": "ins_blog", "collect": (99, "src_blog")},
}

# Every ingestion credential of the test config, whatever its kind.
INGESTION_CREDENTIALS = sorted(
    {c for p in PROJECTS for field in ("cohorly_tokens", "client_keys", "inslytic_keys") for c in p[field]}
    | {s["token"] for p in PROJECTS for s in p["collect_sources"]}
)
# Credentials no project owns: distinctive, so a leak cannot be a coincidence.
INVALID = {
    "cohorly": "tok_bogus_Zq81xk",
    "client": "pk_bogus_Zq81xk",
    "inslytic": "ins_bogus_Zq81xk",
    "collect": "src_bogus_Zq81xk",
    "admin": "adm_bogus_Zq81xk",
}


# -- helpers -------------------------------------------------------------


async def events_of(client: httpx.AsyncClient, project: str, **params: str) -> list[dict[str, Any]]:
    reply = await client.get(
        f"/admin/v1/projects/{project}/events", headers=ADMIN, params={"limit": "1000", **params}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["next"] is None
    return [e for e in reply.json()["events"] if e["name"] != BARRIER]


async def profile_of(client: httpx.AsyncClient, project: str, id_: str) -> dict[str, Any] | None:
    reply = await client.get(f"/admin/v1/projects/{project}/profiles/{id_}", headers=ADMIN)
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def settle(client: httpx.AsyncClient) -> None:
    """Wait until every rejection queued so far is committed: lone rejections
    go through the writer's ordered lane, as every profile operation does, so
    once a later profile operation is acknowledged they are stored too."""
    for project in CREDS:
        reply = await client.post(
            "/engage", headers={"X-Cohorly-Token": CREDS[project]["cohorly"]},
            json={"distinct_id": BARRIER, "$set": {"b": 1}},
        )
        assert reply.status_code == 200, reply.text


async def rejections_of(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    await settle(client)
    reply = await client.get("/admin/v1/rejections", headers=ADMIN, params={"limit": "1000", **params})
    assert reply.status_code == 200, reply.text
    return reply.json()["rejections"]  # type: ignore[no-any-return]


def collect_query(project: str) -> str:
    site, token = CREDS[project]["collect"]
    return f"tc_s={site}&token={token}"


async def send_every_dialect(client: httpx.AsyncClient, project: str, tag: str) -> set[tuple[str, str]]:
    """One write of every kind in every dialect with `project`'s credentials;
    returns the (source, name) of the events it stored."""
    c = CREDS[project]
    user, anon = f"{tag}-user", f"{tag}-anon"
    stored: set[tuple[str, str]] = set()

    # Cohorly: header token on /track, body token on /engage and /alias.
    cohorly = {"X-Cohorly-Token": c["cohorly"]}
    reply = await client.post("/track", headers=cohorly, json=[
        {"event": f"{tag}-cohorly", "properties": {"distinct_id": user, "$insert_id": f"{tag}-i1"}},
    ])
    assert reply.status_code == 200 and reply.json() == {"status": 1, "inserted": 1}, reply.text
    stored.add(("cohorly", f"{tag}-cohorly"))
    reply = await client.post("/engage", json={"token": c["cohorly"], "distinct_id": user, "$set": {"owner": tag}})
    assert reply.status_code == 200 and reply.json()["status"] == 1, reply.text
    reply = await client.post("/alias", json={"token": c["cohorly"], "alias": f"{anon}-c", "distinct_id": user})
    assert reply.status_code == 200 and reply.json() == {"status": 1}, reply.text

    # Client API: every endpoint.
    bearer = {"Authorization": f"Bearer {c['client']}"}
    for path, body in (
        ("/api/client/identify", {"external_id": user, "data": {"client_owner": tag}}),
        ("/api/client/alias", {"anonymous_id": f"{anon}-k", "external_id": user}),
        ("/api/client/devices", {"external_id": user, "device_id": f"{tag}-dev", **DEVICE}),
        ("/api/client/events", [{"external_id": user, "name": f"{tag}-client"}]),
    ):
        reply = await client.post(path, headers=bearer, json=body)
        assert reply.status_code == 204, (path, reply.text)
    stored.add(("client", f"{tag}-client"))

    # Inslytic.
    reply = await client.post("/v1/ingest", headers={"Authorization": f"Bearer {c['inslytic']}"}, json={"events": [{
        "eventName": f"{tag}-inslytic", "timestamp": TS, "anonymousId": f"{anon}-i", "userId": user,
        "sessionId": "s", "consentGiven": True,
    }]})
    assert reply.status_code == 202 and reply.json() == {"accepted": 1}, reply.text
    stored.add(("inslytic", f"{tag}-inslytic"))

    # Collect: token in the query, as a bearer, batch, pixel, /cdp/.
    site, token = c["collect"]
    event = {"user": {"id": user, "consistent_anonymous_id": f"{anon}-t"}}
    for path, extra, body in (
        (f"/events?{collect_query(project)}", {}, {"event_name": f"{tag}-collect-q", **event}),
        (f"/events?tc_s={site}", {"Authorization": f"Bearer {token}"}, {"event_name": f"{tag}-collect-b", **event}),
        (f"/events/batch?{collect_query(project)}", {},
         {"batch": [{"event_name": f"{tag}-collect-1", **event}, {"event_name": f"{tag}-collect-2", **event}]}),
        (f"/cdp/events?{collect_query(project)}", {}, {"event_name": f"{tag}-collect-cdp", **event}),
    ):
        reply = await client.post(path, headers=extra, content=json.dumps(body))
        assert reply.status_code == 200, (path, reply.text)
    reply = await client.get(f"/events?{collect_query(project)}&event_name={tag}-collect-px&user[id]={user}")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/gif", reply.text
    for name in ("q", "b", "1", "2", "cdp", "px"):
        stored.add(("collect", f"{tag}-collect-{name}"))
    return stored


# -- writes stay in the credential's project --------------------------------


async def test_every_dialect_writes_only_into_its_credentials_project(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        sent = {
            "blog": await send_every_dialect(client, "blog", "b"),
            "shop": await send_every_dialect(client, "shop", "s"),
        }
        for project, tag, other in (("blog", "b", "shop"), ("shop", "s", "blog")):
            found = await events_of(client, project)
            assert {(e["source"], e["name"]) for e in found} == sent[project]
            assert all(e["project"] == project for e in found)
            assert all(e["name"].startswith(f"{tag}-") for e in found), found
            # The person and its every link live in its own project only.
            person = await profile_of(client, project, f"{tag}-user")
            assert person is not None
            assert person["properties"]["owner"] == tag
            assert person["properties"]["client_owner"] == tag
            assert set(person["ids"]) == {f"{tag}-user"} | {f"{tag}-anon-{k}" for k in "ckit"}
            assert [d["device_id"] for d in person["devices"]] == [f"{tag}-dev"]
            for id_ in person["ids"]:
                assert await profile_of(client, other, id_) is None, (other, id_)
                assert await events_of(client, other, distinct_id=id_) == []
        # Nothing was quarantined: every credential was valid for what it wrote.
        assert await rejections_of(client) == []


@pytest.mark.parametrize("header", ["tok_shop", "tok_blog"])
async def test_cohorly_batch_mixing_per_record_tokens_lands_each_record_in_its_own_project(
    backend, header
) -> None:
    async with gateway(settings_for(backend)) as client:
        records = [
            ("r0", None), ("r1", "tok_blog"), ("r2", "tok_shop_2"), ("r3", "tok_blog"), ("r4", "tok_shop"),
        ]
        body = [
            {"event": name, "properties": {"distinct_id": "same-id", "$insert_id": name,
                                           **({"token": token} if token else {})}}
            for name, token in records
        ]
        reply = await client.post("/track", headers={"X-Cohorly-Token": header}, json=body)
        assert reply.status_code == 200 and reply.json() == {"status": 1, "inserted": 5}, reply.text
        home = "shop" if header == "tok_shop" else "blog"
        expected = {"shop": set(), "blog": set()}
        for name, token in records:
            owner = {"tok_shop": "shop", "tok_shop_2": "shop", "tok_blog": "blog", None: home}[token]
            expected[owner].add(name)
        for project in ("shop", "blog"):
            found = await events_of(client, project)
            assert {e["name"] for e in found} == expected[project], project
            # The same insert id in another project is another event.
            assert all(e["project"] == project for e in found)

        # /engage batches: `token`, `$token` or the header; same id in both projects.
        ops = [
            {"$token": "tok_blog", "distinct_id": "same-id", "$set": {"where": "blog", "n1": 1}},
            {"token": "tok_shop", "distinct_id": "same-id", "$set": {"where": "shop", "n2": 1}},
            {"distinct_id": "same-id", "$set": {"n3": header}},
            {"token": "tok_shop_2", "distinct_id": "same-id", "$add": {"adds": 1}},
        ]
        reply = await client.post("/engage", headers={"X-Cohorly-Token": header}, json=ops)
        assert reply.status_code == 200 and reply.json()["status"] == 1, reply.text
        shop = await profile_of(client, "shop", "same-id")
        blog = await profile_of(client, "blog", "same-id")
        assert shop is not None and blog is not None
        assert shop["ids"] == ["same-id"] and blog["ids"] == ["same-id"]
        if header == "tok_shop":
            assert shop["properties"] == {"where": "shop", "n2": 1, "n3": header, "adds": 1}
            assert blog["properties"] == {"where": "blog", "n1": 1}
        else:
            assert shop["properties"] == {"where": "shop", "n2": 1, "adds": 1}
            assert blog["properties"] == {"where": "blog", "n1": 1, "n3": header}

        # One record with an unknown token: 401, and nothing of the batch anywhere.
        before = {p: len(await events_of(client, p)) for p in ("shop", "blog")}
        bad = [
            {"event": "x0", "properties": {"distinct_id": "d", "token": "tok_blog"}},
            {"event": "x1", "properties": {"distinct_id": "d", "token": INVALID["cohorly"]}},
            {"event": "x2", "properties": {"distinct_id": "d"}},
        ]
        reply = await client.post("/track", headers={"X-Cohorly-Token": header}, json=bad)
        assert reply.status_code == 401, reply.text
        reply = await client.post("/engage", headers={"X-Cohorly-Token": header}, json=[
            {"$token": "tok_blog", "distinct_id": "d2", "$set": {"a": 1}},
            {"$token": INVALID["cohorly"], "distinct_id": "d2", "$set": {"a": 1}},
        ])
        assert reply.status_code == 401, reply.text
        for project in ("shop", "blog"):
            assert len(await events_of(client, project)) == before[project]
            assert await profile_of(client, project, "d2") is None


async def test_collect_with_another_projects_token_stores_nothing_anywhere(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        event = {"event_name": "crossed", "user": {"id": "u"}, "context": {"event_id": "e1"}}
        # shop's site with blog's token, and blog's site with shop's token.
        for site, token in ((1234, "src_blog"), (99, "src_shop")):
            replies = [
                await client.post(f"/events?tc_s={site}&token={token}", content=json.dumps(event)),
                await client.post(f"/events?tc_s={site}", headers={"Authorization": f"Bearer {token}"},
                                  content=json.dumps(event)),
                await client.post(f"/cdp/events/batch?tc_s={site}&token={token}",
                                  content=json.dumps({"batch": [event]})),
                await client.get(f"/events?tc_s={site}&token={token}&event_name=crossed&user[id]=u"),
            ]
            assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        # A valid bearer does not make a mismatched query pair valid, nor the reverse.
        reply = await client.post("/events?tc_s=1234&token=src_shop", headers={"Authorization": "Bearer src_blog"},
                                  content=json.dumps(event))
        assert reply.status_code == 200
        for project in ("shop", "blog"):
            assert await events_of(client, project) == []
            assert await profile_of(client, project, "u") is None
        found = await rejections_of(client)
        assert found, "unknown sources are quarantined"
        assert {(r["project"], r["source"], r["reason"]) for r in found} == {(None, "collect", "unknown_source")}
        assert await rejections_of(client, project="shop") == []
        assert await rejections_of(client, project="blog") == []


async def test_links_made_in_one_project_never_join_ids_in_another(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        anons = [f"anon-{k}" for k in "ckidtw"]
        ids = ["user-x", *anons]
        # The same id strings get events and profiles in both projects.
        for project in ("shop", "blog"):
            token = CREDS[project]["cohorly"]
            reply = await client.post("/track", headers={"X-Cohorly-Token": token},
                                      json=[{"event": f"seen-{i}", "properties": {"distinct_id": i}} for i in ids])
            assert reply.status_code == 200, reply.text
            reply = await client.post("/engage", headers={"X-Cohorly-Token": token},
                                      json=[{"distinct_id": i, "$set": {"mine": i}} for i in ids])
            assert reply.status_code == 200, reply.text

        # blog links every anonymous id to user-x, through every dialect.
        blog = CREDS["blog"]
        reply = await client.post("/alias", json={"token": blog["cohorly"], "alias": "anon-c", "distinct_id": "user-x"})
        assert reply.status_code == 200, reply.text
        bearer = {"Authorization": f"Bearer {blog['client']}"}
        reply = await client.post("/api/client/alias", headers=bearer,
                                  json={"anonymous_id": "anon-k", "external_id": "user-x"})
        assert reply.status_code == 204, reply.text
        reply = await client.post("/api/client/identify", headers=bearer,
                                  json={"anonymous_id": "anon-d", "external_id": "user-x"})
        assert reply.status_code == 204, reply.text
        reply = await client.post("/v1/ingest", headers={"Authorization": f"Bearer {blog['inslytic']}"},
                                  json={"events": [{"eventName": "login", "timestamp": TS, "anonymousId": "anon-i",
                                                    "userId": "user-x", "sessionId": "s", "consentGiven": True}]})
        assert reply.status_code == 202, reply.text
        reply = await client.post(f"/events?{collect_query('blog')}", content=json.dumps(
            {"event_name": "login", "user": {"id": "user-x", "consistent_anonymous_id": "anon-t"}}))
        assert reply.status_code == 200
        reply = await client.post(f"/events?{collect_query('blog')}", content=json.dumps(
            {"event_name": "login", "user": {"id": "user-x", "consistent_anonymous_id": "anon-w"}}))
        assert reply.status_code == 200

        person = await profile_of(client, "blog", "anon-c")
        assert person is not None and set(person["ids"]) == set(ids)
        assert {e["distinct_id"] for e in await events_of(client, "blog", distinct_id="anon-i")} == set(ids)

        # shop: every id is still its own person, with its own profile and events.
        for id_ in ids:
            found = await profile_of(client, "shop", id_)
            assert found is not None
            assert found["ids"] == [id_], found
            assert found["properties"] == {"mine": id_}
            assert [e["name"] for e in await events_of(client, "shop", distinct_id=id_)] == [f"seen-{id_}"]
        # And shop may link those ids elsewhere: no conflict borrowed from blog.
        reply = await client.post("/alias", json={"token": "tok_shop", "alias": "anon-c", "distinct_id": "other-x"})
        assert reply.status_code == 200 and reply.json() == {"status": 1}, reply.text
        reply = await client.post("/api/client/alias", headers={"Authorization": "Bearer pk_shop"},
                                  json={"anonymous_id": "anon-k", "external_id": "other-x"})
        assert reply.status_code == 204
        other = await profile_of(client, "shop", "other-x")
        assert other is not None and set(other["ids"]) == {"other-x", "anon-c", "anon-k"}
        assert await rejections_of(client, project="shop") == []
        blog_person = await profile_of(client, "blog", "user-x")
        assert blog_person is not None and set(blog_person["ids"]) == set(ids)


# -- ingestion credentials read nothing; admin keys match whole --------------

ADMIN_PATHS = (
    "/admin/v1/projects/shop/events",
    "/admin/v1/projects/blog/events",
    "/admin/v1/projects/shop/events?distinct_id=u&limit=10",
    "/admin/v1/projects/shop/profiles/u",
    "/admin/v1/projects/blog/profiles/u",
    "/admin/v1/projects/nope/events",
    "/admin/v1/rejections",
    "/admin/v1/rejections?project=shop",
    "/admin/v1/rejections?project=blog",
)


async def test_no_ingestion_credential_reads_anything(backend) -> None:
    assert len(INGESTION_CREDENTIALS) == 10
    async with gateway(settings_for(backend)) as client:
        # Something to read, so a leak could not hide behind an empty answer.
        reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                  json={"event": "e", "properties": {"distinct_id": "u"}})
        assert reply.status_code == 200
        for path in ADMIN_PATHS:
            assert (await client.get(path, headers=ADMIN)).status_code in (200, 404), path
            for credential in INGESTION_CREDENTIALS:
                for headers in (
                    {"Authorization": f"Bearer {credential}"},
                    {"Authorization": f"bearer {credential}"},
                    {"X-Cohorly-Token": credential},
                ):
                    reply = await client.get(path, headers=headers)
                    assert reply.status_code == 401, (path, headers, reply.text)
                    assert reply.json() == {"error": "unauthorized"}
                sep = "&" if "?" in path else "?"
                reply = await client.get(f"{path}{sep}tc_s=1234&token={credential}")
                assert reply.status_code == 401, (path, credential)


SECOND_KEY = "adm_second_Kq2"


def near_misses(key: str) -> list[str]:
    return [
        key[:-1], key[:1], key[: len(key) // 2], key[1:],  # prefixes, a suffix
        key + "x", key + "\u00e9", key + key, key + "-" + key, "x" + key,  # extensions
        key.upper(), key[:-1] + chr(ord(key[-1]) ^ 1),  # same length, not equal
    ]


async def test_admin_key_is_matched_whole_not_by_prefix_or_extension(backend) -> None:
    settings = settings_for(backend, admin={"keys": [ADMIN_KEY, SECOND_KEY]})
    async with gateway(settings) as client:
        path = "/admin/v1/projects/shop/events"
        for key in (ADMIN_KEY, SECOND_KEY):
            assert (await client.get(path, headers={"Authorization": f"Bearer {key}"})).status_code == 200
            assert (await client.get(path, headers={"Authorization": f"bearer {key}"})).status_code == 200
        misses = near_misses(ADMIN_KEY) + near_misses(SECOND_KEY) + [
            ADMIN_KEY + SECOND_KEY, SECOND_KEY + ADMIN_KEY, ADMIN_KEY + " " + SECOND_KEY,
            ADMIN_KEY + "," + SECOND_KEY, "adm_", "a", INVALID["admin"],
        ]
        for miss in misses:
            assert miss not in (ADMIN_KEY, SECOND_KEY)
            header = ("Bearer " + miss).encode("utf-8")
            reply = await client.get(path, headers={"Authorization": header})
            assert reply.status_code == 401, miss
            assert reply.json() == {"error": "unauthorized"}
        # The right key under another scheme, or as the scheme, is no key.
        for header in (f"Basic {ADMIN_KEY}", f"Token {ADMIN_KEY}", ADMIN_KEY, f"{ADMIN_KEY} Bearer",
                       f"Bearer{ADMIN_KEY}"):
            reply = await client.get(path, headers={"Authorization": header})
            assert reply.status_code == 401, header


async def test_with_no_admin_keys_nothing_is_authorized(backend) -> None:
    async with gateway(settings_for(backend, admin={"keys": []})) as client:
        for header in ("Bearer ", "Bearer", f"Bearer {ADMIN_KEY}", "Bearer tok_shop"):
            reply = await client.get("/admin/v1/rejections", headers={"Authorization": header})
            assert reply.status_code == 401, header


# -- credentials are never logged or stored -----------------------------------

# The test's own HTTP client logs the URLs it requests (query included); it is
# not part of the gateway.
CLIENT_LOGGERS = ("httpx", "httpcore")


async def send_every_kind_of_credential(client: httpx.AsyncClient) -> None:
    """Valid and invalid credentials in every place each dialect reads them,
    on accepted, refused, invalid and quarantined requests."""
    async def post(path: str, body: Any, status: int, **headers: str) -> None:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await client.post(path, content=content, headers=headers)
        assert reply.status_code == status, (path, reply.status_code, reply.text)

    bad = INVALID
    # Cohorly: header token, per-record `token` / `$token`, /alias token.
    for n, token in enumerate(("tok_shop", "tok_shop_2", "tok_blog")):
        h = {"X-Cohorly-Token": token}
        await post("/track", [{"event": "t", "properties": {"distinct_id": f"d-{n}", "plan": "p"}}], 200, **h)
        await post("/track", {"event": "t", "properties": {"distinct_id": "d", "time": "soon"}}, 400, **h)
        await post("/track", b"{not json", 400, **h)
    await post("/track", {"event": "t", "properties": {"distinct_id": "d"}}, 401, **{"X-Cohorly-Token": bad["cohorly"]})
    await post("/track", [{"event": "t", "properties": {"distinct_id": "rec", "token": "tok_blog"}},
                          {"event": "t", "properties": {"distinct_id": "rec", "token": "tok_shop_2"}}], 200)
    await post("/track", [{"event": "t", "properties": {"distinct_id": "rec", "token": bad["cohorly"]}}], 401,
               **{"X-Cohorly-Token": "tok_shop"})
    await post("/engage", [{"$token": "tok_shop", "distinct_id": "p1", "$set": {"n": "text"}},
                           {"token": "tok_blog", "distinct_id": "p1", "$set": {"n": 1}}], 200)
    # A profile type mismatch is quarantined; its operation carried a token.
    await post("/engage", {"$token": "tok_shop", "distinct_id": "p1", "$add": {"n": 1}}, 200)
    await post("/engage", {"$token": bad["cohorly"], "distinct_id": "p1", "$set": {"n": 2}}, 401)
    await post("/engage", {"token": "tok_shop", "distinct_id": "p1", "$bogus": {}}, 400)
    await post("/alias", {"token": "tok_shop", "alias": "a1", "distinct_id": "p1"}, 200)
    await post("/alias", {"token": "tok_shop", "alias": "a1", "distinct_id": "p2"}, 400)  # conflict
    await post("/alias", {"token": bad["cohorly"], "alias": "a2", "distinct_id": "p1"}, 401)

    # Client API: bearer keys, valid, invalid, wrong scheme; bodies accepted and refused.
    # (Ids are numbered, never named after a credential: a leak must be a leak.)
    for n, key in enumerate(("pk_shop", "sk_shop", "pk_blog")):
        h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        await post("/api/client/identify", {"external_id": f"c-{n}", "anonymous_id": "c-anon",
                                            "data": {"plan": "pro"}}, 204, **h)
        await post("/api/client/events", [{"external_id": f"c-{n}", "name": "buy"}], 204, **h)
        await post("/api/client/events", [{"external_id": f"c-{n}"}], 422, **h)
        await post("/api/client/devices", {"external_id": f"c-{n}", "device_id": "dv", **DEVICE}, 204, **h)
        await post("/api/client/alias", b"{", 400, **h)
    # An alias that cannot be made is quarantined.
    await post("/api/client/alias", {"anonymous_id": "c-anon", "external_id": "c-else"}, 204,
               Authorization="Bearer pk_shop")
    await post("/api/client/events", [{"external_id": "x", "name": "n"}], 401, Authorization=f"Bearer {bad['client']}")
    await post("/api/client/events", [{"external_id": "x", "name": "n"}], 401, Authorization="Basic pk_shop")

    # Inslytic.
    event = {"eventName": "v", "timestamp": TS, "anonymousId": "i-anon", "sessionId": "s", "consentGiven": True}
    for n, key in enumerate(("ins_shop", "ins_blog")):
        await post("/v1/ingest", {"events": [event]}, 202, Authorization=f"Bearer {key}")
        await post("/v1/ingest", {"events": [{**event, "userId": f"i-{n}"}]}, 202, Authorization=f"Bearer {key}")
        await post("/v1/ingest", {"events": [{"eventName": "v"}]}, 400, Authorization=f"Bearer {key}")
    # The anonymous id already belongs to another user: quarantined.
    await post("/v1/ingest", {"events": [{**event, "userId": "i-else"}]}, 202, Authorization="Bearer ins_shop")
    await post("/v1/ingest", {"events": [event]}, 401, Authorization=f"Bearer {bad['inslytic']}")

    # Collect: token in the query and as a bearer; stored, quarantined, refused.
    for site, token in ((1234, "src_shop"), (99, "src_blog"), (1234, "src_blog"), (1234, bad["collect"])):
        q = f"tc_s={site}&token={token}"
        body = {"event_name": "view", "user": {"id": "k-user"}, "context": {"page": {"url": "https://x.example/"}}}
        await post(f"/events?{q}", body, 200)
        await post(f"/events?tc_s={site}", body, 200, Authorization=f"Bearer {token}")
        await post(f"/events/batch?{q}", {"batch": [body, {"no_name": 1}, "not an event"]}, 200)
        await post(f"/events/batch?{q}", {"not_batch": []}, 200)
        await post(f"/cdp/events?{q}", b"{broken", 400)
        reply = await client.get(f"/events?{q}&event_name=px&user[id]=k-user&items[0][id]=7")
        assert reply.status_code == 200
        reply = await client.get(f"/events?{q}&no_event_name=1")
        assert reply.status_code == 200
    # Both the query and the bearer, the bearer a stranger.
    await post("/events?tc_s=1234&token=src_shop", {"event_name": "both"}, 200,
               Authorization=f"Bearer {bad['collect']}")

    # Admin: a wrong key, then the right one (the checks below read with it).
    reply = await client.get("/admin/v1/rejections", headers={"Authorization": f"Bearer {bad['admin']}"})
    assert reply.status_code == 401


def secrets() -> list[str]:
    return [*INGESTION_CREDENTIALS, ADMIN_KEY, *INVALID.values()]


def leaks(text: str) -> list[str]:
    return [s for s in secrets() if s in text]


async def test_credentials_are_never_logged_stored_or_quarantined(backend, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for(backend, quarantine={"per_minute": 100_000})
    async with gateway(settings) as client:
        await send_every_kind_of_credential(client)

        found_rejections = await rejections_of(client)
        stored: dict[str, Any] = {"rejections": found_rejections, "events": {}, "profiles": {}}
        ids: set[str] = {"p1", "p2", "a1", "rec", "c-anon", "c-else", "i-anon", "i-else", "k-user"}
        for project in ("shop", "blog"):
            found = await events_of(client, project)
            stored["events"][project] = found
            for e in found:
                ids.update(i for i in (e.get("distinct_id"), e.get("anonymous_id"), e.get("user_id")) if i)
        for project in ("shop", "blog"):
            for id_ in sorted(ids):
                stored["profiles"][f"{project}/{id_}"] = await profile_of(client, project, id_)
        metrics = (await client.get("/metrics")).text

    # The run did exercise what is checked.
    assert stored["events"]["shop"] and stored["events"]["blog"]
    assert any(stored["profiles"].values())
    reasons = {r["reason"] for r in found_rejections}
    assert {"unknown_source", "no_event_name", "not_an_event", "not_a_batch", "profile_type_mismatch",
            "alias_conflict"} <= reasons, reasons
    assert any(r["excerpt"] for r in found_rejections)
    gateway_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    assert any("rejected" in r.getMessage() for r in gateway_records)

    # Stored events (properties, context, everything) and profiles.
    for project, events in stored["events"].items():
        for e in events:
            assert not leaks(json.dumps(e, ensure_ascii=False)), (project, e)
    for where, profile in stored["profiles"].items():
        assert not leaks(json.dumps(profile, ensure_ascii=False)), (where, profile)
    # The quarantine: detail and excerpt, and every other field.
    for r in found_rejections:
        assert not leaks(r.get("detail") or ""), r
        assert not leaks(r.get("excerpt") or ""), r
        assert not leaks(json.dumps(r, ensure_ascii=False)), r
    # Every log record of the gateway, at every level: message and arguments.
    for record in gateway_records:
        text = record.getMessage() + " " + repr(record.msg) + " " + repr(record.args)
        if record.exc_info:
            text += " " + logging.Formatter().formatException(record.exc_info)
        assert not leaks(text), (record.name, record.levelname, text)
    # The configuration's repr and str, and the metrics.
    assert not leaks(repr(settings)), repr(settings)
    assert not leaks(str(settings))
    assert not leaks(metrics)
