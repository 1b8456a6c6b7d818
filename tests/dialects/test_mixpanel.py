"""Mixpanel over real HTTP (the ASGI app), on both backends: the SDKs' wire
formats (MIXPANEL.md, section 3) on every path, the answers, limits and
identity rules of DIALECTS.md's mixpanel section, and Cohorly unchanged on
the paths they share. Every check goes through the admin API."""

from __future__ import annotations

import base64
import gzip
import json
import time
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest

from tests.support import events_of, gateway, props_of, rejections_of, settings_for

pytestmark = pytest.mark.anyio

MB = 1024 * 1024
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORIGIN = "https://shop.example"
OK_JSON = {"status": 1, "error": None}
T = 1765000000  # 2025-12-06, in seconds


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def python_form(value: Any, **extra: Any) -> str:
    return urlencode({"data": json.dumps(value, separators=(",", ":")), "verbose": 1, "ip": 0, **extra})


def ev(name: str = "Bought", distinct_id: str | None = "u1", token: str = "mp_shop", **props: Any) -> dict:
    properties: dict[str, Any] = {"token": token, **props}
    if distinct_id is not None:
        properties["distinct_id"] = distinct_id
    return {"event": name, "properties": properties}


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_python_sdk_form_track_stores_times_in_seconds(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = [ev("Bought", time=T + 0.25, price=3, **{"$insert_id": "a" * 32, "mp_lib": "python"}),
                ev("Viewed", time=T, **{"$insert_id": "b" * 32})]
        reply = await client.post("/track", content=python_form(body), headers=FORM)
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        stored = {e["name"]: e for e in await events_of(client)}
        assert stored["Bought"]["time"] == T * 1000 + 250
        assert stored["Viewed"]["time"] == T * 1000
        bought = stored["Bought"]
        assert (bought["source"], bought["distinct_id"], bought["insert_id"]) == ("mixpanel", "u1", "a" * 32)
        assert bought["properties"] == {"price": 3, "mp_lib": "python"}
        # ip=0: no client IP kept.
        assert "ip" not in bought["context"]


async def test_node_get_and_post_raw_base64(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        one = ev("Viewed", distinct_id=None, mp_lib="node")
        reply = await client.get("/track", params={"ip": "1", "verbose": "0", "data": b64(one)})
        assert (reply.status_code, reply.text) == (200, "1")
        assert reply.headers["content-type"].startswith("text/plain")
        batch = [ev("e>>>?", f"~~~{i}", time=T * 1000 + i) for i in range(3)]
        raw = "data=" + b64(batch)
        assert "+" in raw
        reply = await client.post("/track", params={"ip": "0", "verbose": "1"}, content=raw, headers=FORM)
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        stored = await events_of(client)
        viewed = next(e for e in stored if e["name"] == "Viewed")
        # No distinct_id, time, $insert_id: stored as sent, at receipt time; ip=1 keeps the IP.
        assert viewed["distinct_id"] is None and viewed["insert_id"] is None
        assert abs(viewed["time"] - time.time() * 1000) < 60_000 and viewed["context"]["ip"] == "127.0.0.1"
        assert sorted(e["time"] for e in stored if e["name"] == "e>>>?") == [T * 1000, T * 1000 + 1, T * 1000 + 2]
        # Sent twice without $insert_id: stored twice, as sent.
        await client.get("/track", params={"verbose": "0", "data": b64(one)})
        assert len([e for e in await events_of(client) if e["name"] == "Viewed"]) == 2


async def test_browser_batch_and_beacon_with_cors_and_dedup(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        batch = [ev("$pageview", "$device:d1", time=T + 0.5, **{"$insert_id": f"k3j4h5g6f7d8s9a{i}"})
                 for i in range(3)]
        body = "data=" + quote(b64(batch), safe="")
        params = {"verbose": "1", "ip": "1", "_": "1765000000000"}
        reply = await client.post("/track/", params=params, content=body, headers={**FORM, "Origin": ORIGIN})
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert reply.headers["access-control-allow-credentials"] == "true"
        # The same batch again by sendBeacon (text/plain), as the SDK re-sends after page hide.
        beacon = await client.post("/track/", params=params, content=body,
                                   headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": ORIGIN})
        assert (beacon.status_code, beacon.json()) == (200, OK_JSON)
        stored = await events_of(client)
        assert len(stored) == 3 and {e["time"] for e in stored} == {T * 1000 + 500}


async def test_gzip_json_body(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = gzip.compress(json.dumps([ev("Zipped", **{"$insert_id": "z1"})]).encode())
        reply = await client.post("/track", params={"verbose": "1"}, content=body,
                                  headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        assert [e["name"] for e in await events_of(client)] == ["Zipped"]


async def test_errors_in_both_answer_styles(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post("/track", content=python_form([ev(""), ev()]), headers=FORM)
        assert reply.status_code == 400 and reply.json()["status"] == 0 and "event" in reply.json()["error"]
        reply = await client.get("/track", params={"verbose": "0", "data": b64(ev(time="yesterday"))})
        assert (reply.status_code, reply.text) == (400, "0")
        reply = await client.get("/track", params={"verbose": "0", "data": "%%%"})
        assert (reply.status_code, reply.text) == (400, "0")
        reply = await client.get("/engage", params={"verbose": "1", "data": b64({"$token": "mp_shop", "$set": {}})})
        assert reply.status_code == 400 and "$distinct_id" in reply.json()["error"]
        reply = await client.get("/groups", params={"verbose": "1", "data": b64(
            {"$token": "mp_shop", "$group_key": "c", "$group_id": "1", "$add": {"n": 1}})})
        assert reply.status_code == 400 and "$add" in reply.json()["error"]
        # An unknown token on a path of Mixpanel alone: its 401.
        reply = await client.get("/track", params={"verbose": "1", "data": b64(ev(token="mp_nope"))})
        assert (reply.status_code, reply.json()) == (401, {"status": 0, "error": "invalid token"})
        reply = await client.post("/track", params={"verbose": "1"}, headers=FORM,
                                  content="data=" + quote(json.dumps([ev(pad="x" * MB)])))
        assert reply.status_code == 413 and reply.json()["status"] == 0
        assert await events_of(client) == []


async def test_engage_every_verb_and_delete_whatever_its_value(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        ops = [
            {"$token": "mp_shop", "$distinct_id": "u1", "$time": T + 0.5, "$set": {"plan": "pro", "n": 1},
             "$ignore_time": True, "$ip": 0},
            {"$token": "mp_shop", "$distinct_id": "u1", "$set_once": {"plan": "free", "first": "a"}},
            {"$token": "mp_shop", "$distinct_id": "u1", "$add": {"n": 2}},
            {"$token": "mp_shop", "$distinct_id": "u1", "$append": {"l": 1}},
            {"$token": "mp_shop", "$distinct_id": "u1", "$union": {"l": [1, 2]}},
            {"$token": "mp_shop", "$distinct_id": "u1", "$remove": {"l": 1}},
            {"$token": "mp_shop", "$distinct_id": "u1", "$unset": ["first"]},
        ]
        reply = await client.post("/engage", content=python_form(ops), headers=FORM)
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        assert await props_of(client, "u1") == {"plan": "pro", "n": 3, "l": [2]}
        gone = {"$token": "mp_shop", "$distinct_id": "u1", "$delete": ""}
        reply = await client.get("/engage", params={"verbose": "0", "data": b64(gone)})
        assert (reply.status_code, reply.text) == (200, "1")
        assert await props_of(client, "u1") is None


async def test_identity_events_link_people_across_dialects(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                          json={"event": "Cohorly", "properties": {"distinct_id": "anon"}})
        await client.get("/track", params={"verbose": "0", "data": b64(ev("Anon", "$device:d1"))})
        links = [
            ev("$identify", "user", **{"$anon_id": "$device:d1", "$identified_id": "user"}),
            ev("$create_alias", "user", alias="anon"),
        ]
        reply = await client.post("/track", params={"verbose": "1"}, content=python_form(links), headers=FORM)
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        names = [e["name"] for e in await events_of(client, distinct_id="user")]
        # The links are not events; every id's events meet under the person.
        assert sorted(names) == ["Anon", "Cohorly"]
        # $merge on /import.
        merge = {"event": "$merge", "properties": {"$distinct_ids": ["user", "other"], "token": "mp_shop"}}
        reply = await client.post("/import", content=python_form(merge), headers={**FORM, **basic("mps_shop")})
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        await client.get("/track", params={"verbose": "0", "data": b64(ev("Other", "other"))})
        assert sorted(e["name"] for e in await events_of(client, distinct_id="anon")) == ["Anon", "Cohorly", "Other"]


async def test_alias_endpoint(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post("/alias", params={"verbose": "1"}, headers=FORM,
                                  content=python_form({"alias": "a1", "distinct_id": "p1", "token": "mp_shop"}))
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        taken = {"event": "$create_alias", "properties": {"alias": "a1", "distinct_id": "p2", "token": "mp_shop"}}
        reply = await client.get("/alias", params={"verbose": "1", "data": b64(taken)})
        assert reply.status_code == 400 and "another person" in reply.json()["error"]


async def test_ignored_events_are_dropped_and_counted(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = [ev("Bot", **{"$ignore": True}), ev("Human", **{"$ignore": ""})]
        reply = await client.post("/track", content=python_form(body), headers=FORM)
        assert (reply.status_code, reply.json()) == (200, OK_JSON)
        assert [e["name"] for e in await events_of(client)] == ["Human"]
        assert [r["reason"] for r in await rejections_of(client, source="mixpanel")] == ["ignored"]


async def test_import_credentials_answers_and_strict(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        rows = [ev("Old", time=T - 86400 * 400, **{"$insert_id": f"imp-{i}"}) for i in range(3)]
        reply = await client.post("/import", json=rows, headers=basic("mps_shop"))
        assert (reply.status_code, reply.json()) == (200, {"code": 200, "num_records_imported": 3, "status": "OK"})
        # A service account, for the project it names; the node SDK's api_key.
        again = await client.post("/import", params={"project_id": "shop"}, json=rows,
                                  headers=basic("svc", "mps_shop"))
        assert again.json() == {"code": 200, "num_records_imported": 3, "status": "OK"}
        node = await client.get("/import", params={"verbose": "0", "api_key": "mps_shop", "data": b64(rows[0])})
        assert (node.status_code, node.text) == (200, "1")
        assert len(await events_of(client)) == 3
        for headers, params in ((basic("nope"), {}), (basic("svc", "mps_shop"), {"project_id": "blog"}), ({}, {})):
            reply = await client.post("/import", params=params, json=rows, headers=headers)
            assert (reply.status_code, reply.json()) == (
                401, {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"})
        bad = [ev("New", **{"$insert_id": "imp-9"}), ev("", **{"$insert_id": "imp-10"})]
        reply = await client.post("/import", params={"strict": "1"}, json=bad, headers=basic("mps_shop"))
        assert reply.status_code == 400
        assert reply.json() == {
            "code": 400, "error": "some data points in the request failed validation",
            "failed_records": [{"index": 1, "$insert_id": "imp-10", "field": "event",
                                "message": "must be a non-empty string"}],
            "num_records_imported": 1, "status": "Bad Request",
        }
        assert "New" in {e["name"] for e in await events_of(client)}
        # Without strict, the invalid record is quarantined and the rest stored.
        reply = await client.post("/import", json=[ev("Fine"), ev("")], headers=basic("mps_shop"))
        assert reply.json()["num_records_imported"] == 1
        assert [r["reason"] for r in await rejections_of(client, source="mixpanel")] == ["invalid"]


async def test_import_strict_as_a_form_field_reports_what_it_does_not_store(backend) -> None:
    # Regression (found writing the OpenAPI document): `strict=1` in the form
    # made translation keep invalid records for the answer, but the answer
    # read `strict` from the query only: 200 `1`, and the record neither
    # listed nor quarantined.
    async with gateway(settings_for(backend)) as client:
        rows = [ev("Kept", **{"$insert_id": "f-1"}), ev("", **{"$insert_id": "f-2"})]
        body = urlencode({"data": json.dumps(rows), "strict": "1"})
        reply = await client.post("/import", content=body, headers={**FORM, **basic("mps_shop")})
        assert reply.status_code == 400
        assert reply.json()["failed_records"] == [
            {"index": 1, "$insert_id": "f-2", "field": "event", "message": "must be a non-empty string"}]
        assert reply.json()["num_records_imported"] == 1
        assert [e["name"] for e in await events_of(client)] == ["Kept"]


async def test_cohorly_unchanged_on_shared_paths_and_mixed_credentials_refused(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        cohorly = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                    json={"event": "C", "properties": {"distinct_id": "u"}})
        assert (cohorly.status_code, cohorly.json()) == (200, {"status": 1, "inserted": 1})
        mixed = [ev("M"), {"event": "C", "properties": {"distinct_id": "u", "token": "tok_shop"}}]
        reply = await client.post("/track", json=mixed)
        assert reply.status_code == 400
        # Nothing known: Cohorly answers, as on a path of its own.
        reply = await client.post("/track", json=ev(token="zzz"))
        assert (reply.status_code, reply.json()) == (401, {"status": 0, "error": "invalid token"})
        assert [e["source"] for e in await events_of(client)] == ["cohorly"]


async def test_rate_limit_when_configured(backend) -> None:
    settings = settings_for(backend, dialects={"mixpanel": {"rate_limit": {"requests": 2, "per_seconds": 60}}})
    async with gateway(settings) as client:
        for _ in range(2):
            assert (await client.get("/groups", params={"verbose": "0", "data": b64({})})).status_code == 401
        reply = await client.get("/groups", params={"verbose": "0", "data": b64({})})
        assert (reply.status_code, reply.text) == (429, "0")
        assert int(reply.headers["retry-after"]) >= 1


async def test_token_in_both_dialects_is_a_config_error(backend) -> None:
    from gateway.config import ConfigError
    from tests.support import PROJECTS

    projects = [{**PROJECTS[0], "mixpanel_tokens": ["tok_shop"]}]
    with pytest.raises(ConfigError, match="share"):
        settings_for(backend, projects=projects)


async def test_disabled(backend) -> None:
    async with gateway(settings_for(backend, dialects={"mixpanel": {"enabled": False}})) as client:
        assert (await client.get("/track", params={"data": b64(ev())})).status_code == 405
        assert (await client.post("/import", json=[ev()])).status_code == 404
        assert isinstance(client, httpx.AsyncClient)
    # Cohorly off: the shared paths are Mixpanel's alone (a Cohorly token is unknown there).
    async with gateway(settings_for(backend, dialects={"cohorly": {"enabled": False}})) as client:
        reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                  json={"event": "E", "properties": {"distinct_id": "u1"}})
        assert (reply.status_code, reply.text) == (401, "0")
        reply = await client.post("/track", json=ev())
        assert (reply.status_code, reply.text) == (200, "1")


MALFORMED = [
    b"", b"data=", b"data=%", b"data=e30", b"data=W10=", b"data=" + quote(b64([1, "x", None])).encode(),
    b"data=" + quote("[" * 70 + "]" * 70).encode(), b"data=" + quote(b64({"event": "x", "properties": [1]})).encode(),
    b"\xff\xfe", b"[" * 2000, b'{"event": 1}', b"verbose=1&ip=0&data=%7B%22a%22", b"&&&==&",
    b"data=" + quote(json.dumps({"event": "x", "properties": {"token": "mp_shop", "time": 1e400}})).encode(),
    b"data=" + quote(json.dumps({"$token": "mp_shop", "$distinct_id": "u", "$union": {"a": 1}})).encode(),
]


async def test_malformed_input_is_answered_never_a_500(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ("/track", "/engage", "/groups", "/alias", "/import"):
            for body in MALFORMED:
                for params in ({"verbose": "1"}, {"verbose": "0"}):
                    reply = await client.post(path, params=params, content=body, headers=FORM)
                    assert 400 <= reply.status_code < 500, (path, body[:40], reply.status_code, reply.text)
                    if path in ("/groups", "/import"):  # Mixpanel's alone
                        assert reply.text == "0" or reply.json()["status"] in (0, "Bad Request", "Unauthorized")
                    else:  # shared: what claims no dialect is answered by Cohorly, in its shape
                        assert reply.text == "0" or reply.json()["status"] == 0, reply.text
            for data in ("", "!!", b64("[" * 100 + "]" * 100), b64("x")):
                reply = await client.get(path, params={"data": data, "verbose": "1", "strict": "1"})
                assert 400 <= reply.status_code < 500, (path, data[:40], reply.text)
        assert await events_of(client) == []
