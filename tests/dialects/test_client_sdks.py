"""What the vendor's mobile SDKs send to the client API, replayed over real
HTTP (the ASGI app), and the same person met through the Cohorly dialect.

The payloads in `payloads/client/` are written from SDKS.md and sent byte for
byte: the iOS SDK leaves nil fields out, the Android SDK sends an explicit
null for every absent optional field, calls its event data `properties` and
adds `sdk_version` to devices. Every check goes through the admin API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio

PAYLOADS = Path(__file__).parent / "payloads" / "client"
IOS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Authorization": "Bearer pk_shop",
    "User-Agent": "Shop/465 CFNetwork/1496.0.7 Darwin/23.5.0",
}
ANDROID = {
    "Content-Type": "application/json; charset=UTF-8",
    "Accept": "application/json",
    "Authorization": "Bearer pk_shop",
    "User-Agent": "okhttp/4.12.0",
}
COHORLY = {"X-Cohorly-Token": "tok_shop"}
CLIENT = {"Authorization": "Bearer pk_shop"}

IOS_ANON = "3F2504E0-4F89-41D3-9A0C-0305E82C3301"
IOS_DEVICE = "5E356E66-03AA-4926-A322-D7F5C89049C1"
IOS_TOKEN = "45d2e0c7bbb649679723a96d92d0fa305e356e6603aa4926a322d7f5c89049c1"
ANDROID_ANON = "b7e1c0a2-5d3f-4e8a-9c61-2f4d8e0a7b19"
ANDROID_DEVICE = "e2c4f1a07b3d4c58"


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def decoded(name: str) -> Any:
    return msgspec.json.decode(payload(name))


async def send(client: httpx.AsyncClient, headers: dict[str, str], path: str, name: str) -> None:
    """Post a captured payload as the SDK does; the SDKs only accept a 204."""
    reply = await client.post(f"/api/client/{path}", headers=headers, content=payload(name))
    assert reply.status_code == 204, (name, reply.text)
    assert reply.content == b""


async def events_of(client: httpx.AsyncClient, **params: str) -> list[dict]:
    reply = await client.get("/admin/v1/projects/shop/events", headers=ADMIN, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]


async def profile_of(client: httpx.AsyncClient, id_: str) -> dict | None:
    reply = await client.get(f"/admin/v1/projects/shop/profiles/{id_}", headers=ADMIN)
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, reply.text
    return reply.json()


async def rejections_of(client: httpx.AsyncClient) -> list[dict]:
    reply = await client.get("/admin/v1/rejections", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    return reply.json()["rejections"]


# -- the captured payloads themselves ----------------------------------------------------


def test_ios_payloads_leave_nil_fields_out_and_android_payloads_send_nulls() -> None:
    # Guards the fixtures: the tests below are only worth what these shapes are.
    for path in PAYLOADS.glob("ios_*.json"):
        assert b"null" not in path.read_bytes(), path.name
    assert "token" not in decoded("ios_register_anonymous.json")
    assert "external_id" not in decoded("ios_track_anonymous.json")[0]
    assert "phone" not in decoded("ios_identify.json")
    register = decoded("android_register_anonymous.json")
    assert (register["external_id"], register["token"], register["sdk_version"]) == (None, None, "2.3.1")
    for item in decoded("android_track_anonymous.json") + decoded("android_track.json"):
        assert "data" not in item and "properties" in item and item["user"] is None
    assert decoded("android_identify.json")["phone"] is None


# -- iOS ------------------------------------------------------------------------------


async def test_ios_session(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        # Launch: the device is registered before push permission (no token),
        # then the first event, both under the anonymous id only.
        await send(client, IOS, "devices", "ios_register_anonymous.json")
        await send(client, IOS, "events", "ios_track_anonymous.json")
        found = await profile_of(client, IOS_ANON)
        assert (found["distinct_id"], found["properties"]) == (IOS_ANON, {})
        assert [(d["device_id"], d["token"]) for d in found["devices"]] == [(IOS_DEVICE, None)]

        # identify(): no external id yet, so alias then identify, concurrently.
        await asyncio.gather(
            send(client, IOS, "alias", "ios_alias.json"),
            send(client, IOS, "identify", "ios_identify.json"),
        )
        await send(client, IOS, "events", "ios_track.json")
        # Push permission granted: the same device again, now with its token.
        await send(client, IOS, "devices", "ios_register.json")

        for id_ in (IOS_ANON, "user-ios-1"):
            found = await profile_of(client, id_)
            assert found is not None, id_
            assert (found["distinct_id"], found["ids"]) == ("user-ios-1", ["user-ios-1", IOS_ANON])
            assert found["properties"] == {
                "$email": "ada@example.com",
                "$timezone": "America/Chicago",
                "$locale": "en-US",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "has_completed_onboarding": True,
            }
            assert found["devices"] == [
                {
                    "device_id": IOS_DEVICE,
                    "token": IOS_TOKEN,
                    "os": "iOS",
                    "os_version": "17.5.1",
                    "model": "iPhone15,2",
                    "app_build": "465",
                    "app_version": "1.2.4",
                }
            ]

        stored = await events_of(client, distinct_id="user-ios-1")
        assert [
            (e["name"], e["distinct_id"], e["anonymous_id"], e["user_id"], e["properties"]) for e in stored
        ] == [
            ("App Opened", IOS_ANON, IOS_ANON, None, {"launch_count": 1, "source": "push"}),
            (
                "Product Purchased",
                "user-ios-1",
                IOS_ANON,
                "user-ios-1",
                {"product_id": 12345, "price": 49.99, "quantity": 4},
            ),
        ]
        for e in stored:
            assert (e["source"], e["project"], e["insert_id"]) == ("client", "shop", None)
            assert e["context"]["user_agent"] == IOS["User-Agent"]
            assert e["time"] == e["received_at"]
        assert await events_of(client, distinct_id=IOS_ANON) == stored
        # The concurrent alias and identify made the same link: no conflict.
        assert await rejections_of(client) == []


@pytest.mark.parametrize("identify_first", [False, True], ids=["alias-first", "identify-first"])
async def test_ios_concurrent_alias_and_identify_land_in_either_order(backend, identify_first) -> None:
    async with gateway(settings_for(backend)) as client:
        await send(client, IOS, "events", "ios_track_anonymous.json")
        calls = [("alias", "ios_alias.json"), ("identify", "ios_identify.json")]
        if identify_first:
            calls.reverse()
        await asyncio.gather(*(send(client, IOS, path, name) for path, name in calls))
        found = await profile_of(client, IOS_ANON)
        assert (found["distinct_id"], found["ids"]) == ("user-ios-1", ["user-ios-1", IOS_ANON])
        assert found["properties"]["$email"] == "ada@example.com"
        assert [e["name"] for e in await events_of(client, distinct_id="user-ios-1")] == ["App Opened"]
        assert await rejections_of(client) == []


# -- Android ----------------------------------------------------------------------------


async def test_android_session(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await send(client, ANDROID, "devices", "android_register_anonymous.json")
        await send(client, ANDROID, "events", "android_track_anonymous.json")
        found = await profile_of(client, ANDROID_ANON)
        assert (found["distinct_id"], found["properties"]) == (ANDROID_ANON, {})
        [registered] = found["devices"]
        assert (registered["device_id"], registered["token"]) == (ANDROID_DEVICE, None)

        await send(client, ANDROID, "alias", "android_alias.json")
        await send(client, ANDROID, "identify", "android_identify.json")
        await send(client, ANDROID, "events", "android_track.json")
        await send(client, ANDROID, "devices", "android_register.json")

        for id_ in (ANDROID_ANON, "user-android-1"):
            found = await profile_of(client, id_)
            assert found is not None, id_
            assert (found["distinct_id"], found["ids"]) == (
                "user-android-1",
                ["user-android-1", ANDROID_ANON],
            )
            # `phone: null` clears a phone that was never set; nothing else is lost.
            assert found["properties"] == {
                "$email": "grace@example.com",
                "$timezone": "Europe/Berlin",
                "$locale": "de-DE",
                "plan": "free",
                "beta": False,
            }
            # sdk_version is not kept; the device was upserted, not duplicated.
            assert found["devices"] == [
                {
                    "device_id": ANDROID_DEVICE,
                    "token": decoded("android_register.json")["token"],
                    "os": "Android",
                    "os_version": "14",
                    "model": "Pixel 8",
                    "app_build": "466",
                    "app_version": "1.2.5",
                }
            ]

        stored = await events_of(client, distinct_id=ANDROID_ANON)
        # The Android SDK's `properties` are the event properties: not lost.
        assert [(e["name"], e["distinct_id"], e["user_id"], e["properties"]) for e in stored] == [
            ("Screen Viewed", ANDROID_ANON, None, {"screen": "Home", "dark_mode": True}),
            ("App Backgrounded", ANDROID_ANON, None, {}),
            (
                "Subscription Started",
                "user-android-1",
                "user-android-1",
                {"plan": "pro", "price": 9.99, "currency": "EUR"},
            ),
        ]
        for e in stored:
            assert (e["source"], e["anonymous_id"]) == ("client", ANDROID_ANON)
            assert e["context"]["user_agent"] == "okhttp/4.12.0"
        assert await events_of(client, distinct_id="user-android-1") == stored
        assert await rejections_of(client) == []


async def test_android_explicit_nulls_clear_what_was_set(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await send(client, ANDROID, "identify", "android_identify.json")
        # The same identify later, after the user removed their time zone: the
        # SDK sends it as null, which clears it; `data: null` keeps the data.
        later = {**decoded("android_identify.json"), "timezone": None, "data": None}
        reply = await client.post("/api/client/identify", headers=ANDROID, json=later)
        assert reply.status_code == 204, reply.text
        assert (await profile_of(client, "user-android-1"))["properties"] == {
            "$email": "grace@example.com",
            "$locale": "de-DE",
            "plan": "free",
            "beta": False,
        }


# -- one person across dialects -------------------------------------------------------------


async def cohorly_track(client: httpx.AsyncClient, events: list[dict]) -> None:
    reply = await client.post("/track", headers=COHORLY, json=events)
    assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": len(events)})


def cohorly_event(name: str, distinct_id: str, insert_id: str) -> dict:
    return {"event": name, "properties": {"distinct_id": distinct_id, "$insert_id": insert_id}}


async def test_identified_here_and_tracked_through_cohorly_is_one_person(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/api/client/identify",
            headers=CLIENT,
            json={"anonymous_id": "anon-1", "external_id": "user-1", "email": "ada@example.com"},
        )
        assert reply.status_code == 204, reply.text
        await cohorly_track(
            client,
            [cohorly_event("Page Viewed", "anon-1", "c-1"), cohorly_event("Checkout", "user-1", "c-2")],
        )
        reply = await client.post(
            "/api/client/events", headers=CLIENT, json=[{"name": "Tapped Buy", "anonymous_id": "anon-1"}]
        )
        assert reply.status_code == 204, reply.text
        # A Cohorly profile update addressed to the anonymous id reaches the person.
        reply = await client.post(
            "/engage", headers=COHORLY, json={"distinct_id": "anon-1", "$set": {"plan": "pro"}}
        )
        assert reply.json() == {"status": 1, "applied": 1}

        expected = [
            ("Page Viewed", "cohorly", "anon-1"),
            ("Checkout", "cohorly", "user-1"),
            ("Tapped Buy", "client", "anon-1"),
        ]
        for id_ in ("user-1", "anon-1"):
            stored = await events_of(client, distinct_id=id_)
            assert [(e["name"], e["source"], e["distinct_id"]) for e in stored] == expected, id_
        found = await profile_of(client, "anon-1")
        assert (found["distinct_id"], found["ids"]) == ("user-1", ["user-1", "anon-1"])
        assert found["properties"] == {"$email": "ada@example.com", "plan": "pro"}
        assert await profile_of(client, "user-1") == found


async def test_cohorly_alias_first_then_client_events_and_devices_is_one_person(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/alias", headers=COHORLY, json={"alias": "anon-1", "distinct_id": "user-1"}
        )
        assert (reply.status_code, reply.json()) == (200, {"status": 1})
        await cohorly_track(client, [cohorly_event("Signed Up", "user-1", "c-1")])

        reply = await client.post(
            "/api/client/events",
            headers=CLIENT,
            json=[{"name": "App Opened", "anonymous_id": "anon-1", "data": {"cold": True}}],
        )
        assert reply.status_code == 204, reply.text
        device = {
            "anonymous_id": "anon-1",
            "device_id": "d-1",
            "token": "t-1",
            "os": "iOS",
            "os_version": "17.5",
            "model": "iPhone15,2",
            "app_build": "465",
            "app_version": "1.2.4",
        }
        reply = await client.post("/api/client/devices", headers=CLIENT, json=device)
        assert reply.status_code == 204, reply.text
        # The SDK's own identify makes the link Cohorly already made: no conflict.
        reply = await client.post(
            "/api/client/identify",
            headers=CLIENT,
            json={"anonymous_id": "anon-1", "external_id": "user-1", "locale": "en"},
        )
        assert reply.status_code == 204, reply.text

        for id_ in ("user-1", "anon-1"):
            stored = await events_of(client, distinct_id=id_)
            assert [(e["name"], e["source"], e["distinct_id"]) for e in stored] == [
                ("Signed Up", "cohorly", "user-1"),
                ("App Opened", "client", "anon-1"),
            ], id_
            found = await profile_of(client, id_)
            assert (found["distinct_id"], found["ids"]) == ("user-1", ["user-1", "anon-1"])
            assert found["properties"] == {"$locale": "en"}
            assert [(d["device_id"], d["token"]) for d in found["devices"]] == [("d-1", "t-1")]
        assert await rejections_of(client) == []
