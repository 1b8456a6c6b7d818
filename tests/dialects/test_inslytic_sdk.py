"""What the vendor's Node SDK sends, over HTTP (the ASGI app), on both backends.

The payloads in `payloads/inslytic/` are written from SDKS.md: the Node SDK
(`InslyticNode`) flushes batches of 20 events (and whatever is queued every
10 s), with `sessionId: ""` and `consentGiven: true` by default, timestamps
from `Date.prototype.toISOString()`, `userId: null` before identify, and
`identify(userId)` as an event named `$identify` whose userId and anonymousId
are both that id (and the later events carry the same pair).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio

PAYLOADS = Path(__file__).parent / "payloads" / "inslytic"
SHOP = {"Authorization": "Bearer ins_shop", "Content-Type": "application/json"}
ANON = "0b8f6f9e-3c1d-4e5a-9f21-7d6c2a41b0e3"


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def sent(name: str) -> list[dict[str, Any]]:
    return json.loads(payload(name))["events"]


def ms(stamp: str) -> int:
    # Independent of the gateway's parser: the standard library's, by hand.
    moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return round(moment.timestamp() * 1000)


async def post(client: httpx.AsyncClient, name: str) -> httpx.Response:
    return await client.post("/v1/ingest", headers=SHOP, content=payload(name))


async def events_of(client: httpx.AsyncClient, **params: str) -> list[dict]:
    reply = await client.get(
        "/admin/v1/projects/shop/events", headers=ADMIN, params={"limit": "1000", **params}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]


async def rejections_of(client: httpx.AsyncClient) -> list[dict]:
    reply = await client.get("/admin/v1/rejections", headers=ADMIN, params={"project": "shop"})
    assert reply.status_code == 200, reply.text
    return reply.json()["rejections"]


def assert_stored_as_sent(stored: list[dict], events: list[dict]) -> None:
    assert len(stored) == len(events)
    for got, want in zip(stored, events, strict=True):
        assert got["name"] == want["eventName"]
        assert got["time"] == ms(want["timestamp"]), want["timestamp"]
        assert got["session_id"] == ""
        assert got["consent"] is True
        assert got["source"] == "inslytic" and got["project"] == "shop"
        assert got["properties"] == want["properties"]
        assert got["anonymous_id"] == want["anonymousId"]
        assert got["user_id"] == want["userId"]
        assert got["distinct_id"] == (want["userId"] or want["anonymousId"])


@pytest.mark.parametrize("name", ["node_batch_anonymous.json", "node_batch_identified.json"])
async def test_a_full_flush_of_20_events_is_stored(backend, name) -> None:
    events = sent(name)
    assert len(events) == 20
    async with gateway(settings_for(backend)) as client:
        reply = await post(client, name)
        assert (reply.status_code, reply.json()) == (202, {"accepted": 20})
        assert_stored_as_sent(await events_of(client), events)
        assert await rejections_of(client) == []


async def test_identify_with_equal_ids_is_stored_without_a_link_or_rejection(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for name in ("node_batch_identified.json", "node_identify.json", "node_identify.json"):
            assert (await post(client, name)).status_code == 202, name
        identifies = await events_of(client, name="$identify")
        assert [(e["distinct_id"], e["anonymous_id"], e["user_id"]) for e in identifies] == [
            ("user_42", "user_42", "user_42"),
            ("user_99", "user_99", "user_99"),
            ("user_99", "user_99", "user_99"),
        ]
        # Linking an id to itself is no problem: nothing in the quarantine.
        assert await rejections_of(client) == []
        # The SDK never sends the anonymous id beside the user id, so no link
        # is made: the anonymous events stay under their own id.
        assert len(await events_of(client, distinct_id=ANON)) == 7
        assert len(await events_of(client, distinct_id="user_42")) == 13
        assert len(await events_of(client, distinct_id="user_99")) == 2


async def test_a_day_of_flushes_under_the_default_limit(backend) -> None:
    names = [
        "node_batch_anonymous.json",
        "node_batch_identified.json",
        "node_timer_flush.json",
        "node_identify.json",
    ]
    async with gateway(settings_for(backend)) as client:
        for name in names:
            reply = await post(client, name)
            assert (reply.status_code, reply.json()) == (202, {"accepted": len(sent(name))}), name
        expected = [event for name in names for event in sent(name)]
        stored = await events_of(client)
        assert_stored_as_sent(stored, expected)
        timer_first = stored[40]
        assert timer_first["context"]["page_url"] == "https://shop.example/account"
        assert (timer_first["context"]["device_type"], timer_first["context"]["os"]) == ("desktop", "linux")
        assert await rejections_of(client) == []
