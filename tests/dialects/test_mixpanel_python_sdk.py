"""Mixpanel's Python SDK (PyPI `mixpanel`, unmodified) against a live gateway.

The SDK builds `https://{api_host}/track` and friends from `api_host`, so a
plain-HTTP gateway is reached through its per-endpoint URL overrides
(`events_url`, `people_url`, `groups_url`, `import_url`), as the README's
"Moving from Mixpanel" says. What landed is read back through the admin API
of the same server. The SDK is blocking `requests`, so these tests are
synchronous.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import mixpanel
import pytest
from mixpanel import BufferedConsumer, Consumer, Mixpanel, MixpanelException, ServiceAccountCredentials

from tests.dialects.mixpanel_sdks import (
    SECRET,
    SERVICE_SECRET,
    SERVICE_USER,
    TOKEN,
    Admin,
    caller_properties,
    mixpanel_gateway,
    now_ms,
)
from tests.faults.proxy import TcpProxy


def urls(base: str) -> dict[str, str]:
    """The SDK's endpoint overrides for a gateway at `base`."""
    return {
        "events_url": f"{base}/track",
        "people_url": f"{base}/engage",
        "groups_url": f"{base}/groups",
        "import_url": f"{base}/import",
    }


@pytest.fixture
def server(backend) -> Iterator[tuple[str, Admin]]:
    with mixpanel_gateway(backend) as found:
        yield found


def stamped_python(event: dict[str, Any]) -> None:
    props = event["properties"]
    assert props.get("mp_lib", props.get("$lib")) == "python"
    assert props["$lib_version"] == mixpanel.__version__
    assert event["source"] == "mixpanel"
    assert event["project"] == "shop"


# -- events --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["consumer", "buffered"])
def test_track_and_import(server, kind: str) -> None:
    url, admin = server
    consumer: Consumer | BufferedConsumer = (
        Consumer(**urls(url), retry_limit=0) if kind == "consumer" else BufferedConsumer(**urls(url), retry_limit=0)
    )
    mp = Mixpanel(TOKEN, consumer=consumer)
    before = now_ms()
    mp.track("user-1", "Signed Up", {"plan": "pro", "seats": 3, "nested": {"a": [1, 2.5, None]}})
    after = now_ms()
    # The SDK's own float seconds are the time; a caller's `time` replaces them.
    mp.track("user-1", "Logged In", {"time": 1_765_000_000.25})
    # import_data: whole seconds, to /import with the project secret (Basic).
    mp.import_data(None, "user-2", "Old Purchase", 1_600_000_000, {"amount": 9.5}, api_secret=SECRET)
    if isinstance(consumer, BufferedConsumer):
        assert admin.events() == []  # buffered, nothing sent yet
        consumer.flush()

    stored = admin.events()
    assert [e["name"] for e in stored] == ["Signed Up", "Logged In", "Old Purchase"]
    assert [e["distinct_id"] for e in stored] == ["user-1", "user-1", "user-2"]
    assert caller_properties(stored[0]) == {"plan": "pro", "seats": 3, "nested": {"a": [1, 2.5, None]}}
    assert caller_properties(stored[1]) == {}
    assert caller_properties(stored[2]) == {"amount": 9.5}
    for event in stored:
        stamped_python(event)
        # The SDK stamps a uuid4 hex $insert_id; it becomes the canonical one.
        assert re.fullmatch(r"[0-9a-f]{32}", event["insert_id"])
    assert len({e["insert_id"] for e in stored}) == 3
    # Float seconds from the SDK's clock, to the second (not January 1970).
    assert before // 1000 <= stored[0]["time"] // 1000 <= after // 1000
    assert stored[1]["time"] == 1_765_000_000_250
    assert stored[2]["time"] == 1_600_000_000_000
    assert stored[2]["received_at"] >= before


def test_import_with_a_service_account(server) -> None:
    url, admin = server
    credentials = ServiceAccountCredentials(SERVICE_USER, SERVICE_SECRET, "shop")
    mp = Mixpanel(TOKEN, consumer=Consumer(**urls(url), retry_limit=0, credentials=credentials))
    mp.import_data(None, "user-3", "Backfilled", 1_500_000_000, {"batch": 1})
    (event,) = admin.events()
    assert (event["name"], event["distinct_id"], event["time"]) == ("Backfilled", "user-3", 1_500_000_000_000)
    assert caller_properties(event) == {"batch": 1}


def test_wrong_credentials_are_an_sdk_error_and_nothing_is_stored(server) -> None:
    url, admin = server
    consumer = Consumer(**urls(url), retry_limit=0)
    with pytest.raises(MixpanelException, match="Mixpanel error"):
        Mixpanel("mp_nobody", consumer=consumer).track("user-1", "Signed Up")
    with pytest.raises(MixpanelException, match="Mixpanel error"):
        Mixpanel("mp_nobody", consumer=consumer).people_set("user-1", {"a": 1})
    with pytest.raises(MixpanelException):
        Mixpanel(TOKEN, consumer=consumer).import_data(None, "user-1", "Old", 1_600_000_000, api_secret="wrong")
    assert admin.events() == []
    assert admin.profile("user-1") is None


# -- people ----------------------------------------------------------------------


def every_people_call(mp: Mixpanel) -> None:
    mp.people_set("user-1", {"name": "Ada", "plan": "free", "tags": ["a"]})
    mp.people_set("user-1", {"plan": "team"}, meta={"$ignore_time": True, "$ip": 0})
    mp.people_set_once("user-1", {"plan": "pro", "first_seen": "2024-01-01"})
    mp.people_increment("user-1", {"logins": 1, "score": 2.5})
    mp.people_increment("user-1", {"logins": 2, "score": -1})
    mp.people_append("user-1", {"tags": "b"})
    mp.people_append("user-1", {"visits": "/home"})  # a missing key starts a list
    mp.people_union("user-1", {"tags": ["b", "c", "a", "d"]})
    mp.people_remove("user-1", {"tags": "d"})
    mp.people_unset("user-1", ["first_seen", "never_set"])
    mp.people_track_charge("user-1", 9.5, {"sku": "A-1"})
    mp.people_track_charge("user-1", 20)
    mp.people_set("user-2", {"name": "Bo"})
    mp.people_track_charge("user-2", 5)
    mp.people_clear_charges("user-2")
    mp.people_update({"$distinct_id": "user-3", "$set": {"kind": "raw"}})


EXPECTED_USER_1 = {
    "name": "Ada",
    "plan": "team",
    "tags": ["a", "b", "c"],
    "logins": 3,
    "score": 1.5,
    "visits": ["/home"],
    "$transactions": [{"sku": "A-1", "$amount": 9.5}, {"$amount": 20}],
}


def test_every_people_call_with_consumer(server) -> None:
    url, admin = server
    mp = Mixpanel(TOKEN, consumer=Consumer(**urls(url), retry_limit=0))
    mp.people_set("user-1", {"name": "Ada", "plan": "free", "tags": ["a"]})
    assert admin.properties("user-1") == {"name": "Ada", "plan": "free", "tags": ["a"]}
    every_people_call(mp)
    assert admin.properties("user-1") == EXPECTED_USER_1
    assert admin.properties("user-2") == {"name": "Bo"}
    assert admin.properties("user-3") == {"kind": "raw"}
    person = admin.profile("user-1")
    assert person is not None and person["ids"] == ["user-1"]

    mp.track("user-1", "Still Here")
    mp.people_delete("user-1")  # the SDK sends `$delete: ""`
    assert admin.profile("user-1") is None
    # Deleting a profile keeps the person's events.
    assert [e["name"] for e in admin.events(distinct_id="user-1")] == ["Still Here"]


def test_every_people_call_with_buffered_consumer_applies_in_order(server) -> None:
    url, admin = server
    consumer = BufferedConsumer(**urls(url), retry_limit=0)
    mp = Mixpanel(TOKEN, consumer=consumer)
    every_people_call(mp)
    assert admin.profile("user-1") is None  # buffered
    consumer.flush()
    # One array on /engage: the verbs apply in the order they were sent.
    assert admin.properties("user-1") == EXPECTED_USER_1
    assert admin.properties("user-2") == {"name": "Bo"}
    mp.people_delete("user-2")
    consumer.flush()
    assert admin.profile("user-2") is None


# -- groups ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["consumer", "buffered"])
def test_every_group_call(server, kind: str) -> None:
    url, admin = server
    consumer: Consumer | BufferedConsumer = (
        Consumer(**urls(url), retry_limit=0) if kind == "consumer" else BufferedConsumer(**urls(url), retry_limit=0)
    )
    mp = Mixpanel(TOKEN, consumer=consumer)

    def flushed() -> None:
        if isinstance(consumer, BufferedConsumer):
            consumer.flush()

    mp.group_set("company", "acme", {"name": "Acme", "tier": "gold", "products": ["anvil"]})
    mp.group_set_once("company", "acme", {"tier": "silver", "founded": 1999})
    mp.group_union("company", "acme", {"products": ["rocket", "anvil", "magnet"]})
    mp.group_remove("company", "acme", {"products": "magnet"})
    mp.group_unset("company", "acme", ["founded"])
    mp.group_update({"$group_key": "company", "$group_id": "other", "$set": {"name": "Other"}})
    mp.group_set("team", "acme", {"size": 4})  # same id, another key: another group
    flushed()
    acme = admin.group_properties("company", "acme")
    assert acme == {"name": "Acme", "tier": "gold", "products": ["anvil", "rocket"]}
    assert admin.group_properties("company", "other") == {"name": "Other"}
    assert admin.group_properties("team", "acme") == {"size": 4}
    # Groups are apart from person profiles.
    assert admin.profile("acme") is None

    mp.group_delete("company", "acme")  # the SDK sends `$delete: ""`
    flushed()
    assert admin.group("company", "acme") is None
    assert admin.group_properties("team", "acme") == {"size": 4}


# -- identity --------------------------------------------------------------------


def test_merge_links_two_ids_into_one_person(server) -> None:
    url, admin = server
    mp = Mixpanel(TOKEN, consumer=Consumer(**urls(url), retry_limit=0))
    mp.track("anon-1", "Viewed Page")
    mp.people_set("anon-1", {"utm": "ad"})
    mp.people_set("user-1", {"name": "Ada"})
    mp.track("user-1", "Purchased")
    mp.merge(None, "anon-1", "user-1", api_secret=SECRET)  # a $merge event on /import
    for id_ in ("anon-1", "user-1"):
        person = admin.profile(id_)
        assert person is not None
        assert sorted(person["ids"]) == ["anon-1", "user-1"]
        assert person["properties"] == {"name": "Ada", "utm": "ad"}
        assert [e["name"] for e in admin.events(distinct_id=id_)] == ["Viewed Page", "Purchased"]
    # $merge is a link, not an event.
    assert admin.named("$merge") == []


def test_merge_through_buffered_consumer_with_a_service_account(server) -> None:
    url, admin = server
    credentials = ServiceAccountCredentials(SERVICE_USER, SERVICE_SECRET, "shop")
    consumer = BufferedConsumer(**urls(url), retry_limit=0, credentials=credentials)
    mp = Mixpanel(TOKEN, consumer=consumer)
    mp.people_set("user-7", {"name": "Cy"})
    mp.merge(None, "device-7", "user-7")
    mp.import_data(None, "device-7", "Installed", 1_700_000_000)
    consumer.flush()  # /engage, then /import: the $merge and the event in one array
    for id_ in ("device-7", "user-7"):
        person = admin.profile(id_)
        assert person is not None and sorted(person["ids"]) == ["device-7", "user-7"]
        assert person["properties"] == {"name": "Cy"}
    assert [e["name"] for e in admin.events(distinct_id="user-7")] == ["Installed"]


def test_alias(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`alias()` always sends through a new default `Consumer()` (to
    api.mixpanel.com, whatever consumer the instance has); the SDK cannot be
    pointed elsewhere for it. Here the module's `Consumer` name, which alias()
    looks up, builds one with the gateway's URLs: the SDK's own code then
    sends its own `$create_alias` event."""
    url, admin = server
    mp = Mixpanel(TOKEN, consumer=Consumer(**urls(url), retry_limit=0))
    mp.people_set("user-1", {"name": "Ada"})
    mp.track("anon-1", "Viewed Page")
    monkeypatch.setattr(mixpanel, "Consumer", lambda: Consumer(**urls(url), retry_limit=0))
    mp.alias("anon-1", "user-1")  # alias_id, original
    monkeypatch.undo()
    person = admin.profile("anon-1")
    assert person is not None
    assert person["distinct_id"] == "user-1"
    assert sorted(person["ids"]) == ["anon-1", "user-1"]
    assert person["properties"] == {"name": "Ada"}
    assert [e["name"] for e in admin.events(distinct_id="user-1")] == ["Viewed Page"]
    assert admin.named("$create_alias") == []

    # The README's way without touching the SDK: the same event through track().
    mp.track("user-1", "$create_alias", {"alias": "anon-2"})
    person = admin.profile("anon-2")
    assert person is not None and sorted(person["ids"]) == ["anon-1", "anon-2", "user-1"]
    assert admin.named("$create_alias") == []


# -- the retry path ----------------------------------------------------------------


def test_batch_resent_after_a_lost_answer_is_stored_once(server) -> None:
    """BufferedConsumer keeps a batch whose send failed and sends it again on
    the next flush(), with the same $insert_ids. Through a proxy that drops
    the gateway's answer, the first send is stored but the SDK sees a
    timeout; the re-send is stored once."""
    url, admin = server
    host, port = url.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        via_proxy = f"http://127.0.0.1:{proxy.port}"
        consumer = BufferedConsumer(**urls(via_proxy), retry_limit=0, request_timeout=2)
        mp = Mixpanel(TOKEN, consumer=consumer)
        for i in range(5):
            mp.track("user-1", "Order Completed", {"n": i})
        proxy.mute_after = b"POST /track"
        with pytest.raises(MixpanelException):
            consumer.flush()
        stored = admin.wait_for_events(5)
        assert sorted(e["properties"]["n"] for e in stored) == list(range(5))
        proxy.mute_after = None
        consumer.flush()  # the same batch again
    stored = admin.events()
    assert len(stored) == 5
    assert sorted(e["properties"]["n"] for e in stored) == list(range(5))
    assert admin.metric('dialgate_events_deduplicated_total{dialect="mixpanel",project="shop"}') == 5
