"""The vendor's Python SDK (PyPI `cohorly`, unmodified) against a real gateway.

Each test starts a live hypercorn server (tests.support.live_server), points
the SDK at it through `api_host`, and reads back what landed through the
admin API of the same server. The SDK is blocking urllib, so these tests are
synchronous.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import cohorly
import httpx
import pytest
from cohorly import BufferedConsumer, Cohorly, CohorlyException, Consumer

from tests.support import ADMIN, live_server, settings_for

# The live server sees one client IP; lift the per-IP limit where a test
# sends many requests.
UNLIMITED = {"cohorly": {"rate_limit": {"requests": 100000, "per_seconds": 1}}}
LIFTED_KEYS = ("token", "distinct_id", "time", "$insert_id")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Admin:
    """Reads through the admin API of the live server."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def events(self, project: str = "shop", **params: Any) -> list[dict[str, Any]]:
        reply = self.client.get(f"/admin/v1/projects/{project}/events", params={"limit": 1000, **params})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["next"] is None
        return body["events"]

    def profile(self, id_: str, project: str = "shop") -> dict[str, Any] | None:
        reply = self.client.get(f"/admin/v1/projects/{project}/profiles/{id_}")
        if reply.status_code == 404:
            return None
        assert reply.status_code == 200, reply.text
        return reply.json()

    def properties(self, id_: str) -> dict[str, Any]:
        found = self.profile(id_)
        assert found is not None, f"no profile for {id_}"
        return found["properties"]

    def metric(self, line_start: str) -> float:
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def server(backend) -> Iterator[tuple[str, Admin]]:
    with live_server(settings_for(backend)) as url, httpx.Client(base_url=url, headers=ADMIN) as client:
        yield url, Admin(client)


@pytest.fixture
def unlimited_server(backend) -> Iterator[tuple[str, Admin]]:
    with live_server(settings_for(backend, dialects=UNLIMITED)) as url, httpx.Client(
        base_url=url, headers=ADMIN, timeout=30
    ) as client:
        yield url, Admin(client)


# -- /track ------------------------------------------------------------------


def test_track_with_the_default_consumer(server) -> None:
    url, admin = server
    ch = Cohorly("tok_shop", api_host=url)
    before = now_ms()
    ch.track("user-1", "Signed Up", {"plan": "pro", "seats": 3, "nested": {"a": [1, 2.5, None]}})
    after = now_ms()
    ch.track("user-1", "Logged In", {"time": 1_700_000_000_123})
    ch.import_data("user-2", "Old Purchase", 1_600_000_000_000, {"amount": 9.5})

    stored = admin.events()
    assert [e["name"] for e in stored] == ["Signed Up", "Logged In", "Old Purchase"]
    assert [e["distinct_id"] for e in stored] == ["user-1", "user-1", "user-2"]
    assert {e["source"] for e in stored} == {"cohorly"}
    assert {e["project"] for e in stored} == {"shop"}
    sdk_stamps = {"$lib": "python", "$lib_version": cohorly.__version__}
    assert stored[0]["properties"] == {"plan": "pro", "seats": 3, "nested": {"a": [1, 2.5, None]}, **sdk_stamps}
    assert stored[1]["properties"] == sdk_stamps
    assert stored[2]["properties"] == {"amount": 9.5, **sdk_stamps}
    for event in stored:
        for key in LIFTED_KEYS:
            assert key not in event["properties"]
        # The SDK stamps a uuid4 hex $insert_id; it becomes the canonical insert_id.
        assert re.fullmatch(r"[0-9a-f]{32}", event["insert_id"])
        assert event["context"]["ip"] == "127.0.0.1"
        assert event["context"]["user_agent"].startswith("Python-urllib/")
    assert len({e["insert_id"] for e in stored}) == 3
    # The SDK's own `time` (now, in ms) is the event time, not the receipt time.
    assert before <= stored[0]["time"] <= after
    assert stored[1]["time"] == 1_700_000_000_123
    assert stored[2]["time"] == 1_600_000_000_000
    assert stored[2]["received_at"] >= before


def test_token_in_the_body_chooses_the_project(server) -> None:
    url, admin = server
    Cohorly("tok_blog", api_host=url).track("reader-1", "Read Post", {"slug": "hello"})
    Cohorly("tok_shop_2", api_host=url).track("buyer-1", "Bought")
    assert [e["name"] for e in admin.events("blog")] == ["Read Post"]
    assert [e["name"] for e in admin.events("shop")] == ["Bought"]


def test_unknown_token_is_refused_and_nothing_stored(server) -> None:
    url, admin = server
    # 401 is not retryable for the synchronous consumer: it raises at once.
    ch = Cohorly("tok_nobody", api_host=url, consumer=Consumer(api_host=url, retry_limit=0))
    with pytest.raises(CohorlyException, match="status=401"):
        ch.track("user-1", "Signed Up")
    with pytest.raises(CohorlyException, match="status=401"):
        ch.people_set("user-1", {"a": 1})
    assert admin.events() == []
    assert admin.profile("user-1") is None


def test_track_with_buffered_consumer(server) -> None:
    url, admin = server
    consumer = BufferedConsumer(max_size=50, api_host=url)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    for i in range(7):
        ch.track(f"user-{i % 2}", f"Step {i}", {"i": i})
    assert admin.events() == []  # buffered, nothing sent yet
    assert consumer.flush() is True
    stored = admin.events()
    assert [e["name"] for e in stored] == [f"Step {i}" for i in range(7)]
    assert [e["properties"]["i"] for e in stored] == list(range(7))
    assert [e["distinct_id"] for e in stored] == [f"user-{i % 2}" for i in range(7)]
    assert all(e["properties"]["$lib"] == "python" and "token" not in e["properties"] for e in stored)
    assert consumer.flush() is True  # nothing left
    assert len(admin.events()) == 7


def test_buffered_consumer_auto_flushes_full_batches(server) -> None:
    url, admin = server
    consumer = BufferedConsumer(max_size=3, api_host=url)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    for i in range(7):
        ch.track("user-1", "Tick", {"i": i})
    # Two full batches of 3 went out as arrays; one event still waits.
    assert [e["properties"]["i"] for e in admin.events()] == list(range(6))
    assert consumer.flush() is True
    assert [e["properties"]["i"] for e in admin.events()] == list(range(7))


def test_rate_limited_consumer_honours_retry_after(backend) -> None:
    settings = settings_for(backend, dialects={"cohorly": {"rate_limit": {"requests": 1, "per_seconds": 1}}})
    with live_server(settings) as url, httpx.Client(base_url=url, headers=ADMIN) as client:
        admin = Admin(client)
        slept: list[float] = []
        consumer = Consumer(api_host=url, retry_limit=3)
        consumer._sleep = lambda seconds: (slept.append(seconds), time.sleep(seconds))  # observe only
        ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
        ch.track("user-1", "First")
        ch.track("user-1", "Second")  # 429 with Retry-After: 1, then retried
        assert [e["name"] for e in admin.events()] == ["First", "Second"]
        # The SDK honours an integer Retry-After exactly (no jitter): it was sent.
        assert slept and slept[0] == 1.0
        assert admin.metric('dialgate_rejections_total{dialect="cohorly",reason="rate_limited"}') >= 1


# -- /engage -----------------------------------------------------------------


def test_every_people_call(server) -> None:
    url, admin = server
    ch = Cohorly("tok_shop", api_host=url)

    ch.people_set("user-1", {"name": "Ada", "plan": "free", "tags": ["a"]})
    assert admin.properties("user-1") == {"name": "Ada", "plan": "free", "tags": ["a"]}

    ch.people_set("user-1", {"plan": "team"})
    assert admin.properties("user-1") == {"name": "Ada", "plan": "team", "tags": ["a"]}

    ch.people_set_once("user-1", {"plan": "pro", "first_seen": "2024-01-01"})
    assert admin.properties("user-1") == {"name": "Ada", "plan": "team", "tags": ["a"], "first_seen": "2024-01-01"}

    ch.people_increment("user-1", {"logins": 1, "score": 2.5})
    ch.people_increment("user-1", {"logins": 2, "score": -1})
    props = admin.properties("user-1")
    assert props["logins"] == 3
    assert props["score"] == 1.5

    ch.people_unset("user-1", ["first_seen", "never_set"])
    assert admin.properties("user-1") == {"name": "Ada", "plan": "team", "tags": ["a"], "logins": 3, "score": 1.5}

    ch.people_update({"distinct_id": "user-1", "$append": {"tags": "b"}})
    assert admin.properties("user-1")["tags"] == ["a", "b"]
    ch.people_update({"distinct_id": "user-1", "$append": {"visits": "/home"}})  # a missing key starts a list
    assert admin.properties("user-1")["visits"] == ["/home"]
    ch.people_update({"distinct_id": "user-1", "$union": {"tags": ["b", "c", "a", "d"]}})
    assert admin.properties("user-1")["tags"] == ["a", "b", "c", "d"]
    ch.people_update({"distinct_id": "user-1", "$append": {"tags": "b"}})
    assert admin.properties("user-1")["tags"] == ["a", "b", "c", "d", "b"]
    ch.people_update({"distinct_id": "user-1", "$remove": {"tags": "b"}})  # every occurrence
    assert admin.properties("user-1")["tags"] == ["a", "c", "d"]
    # One operation, several verbs: $append, then $union, then $remove.
    ch.people_update(
        {"distinct_id": "user-1", "$append": {"x": 1}, "$union": {"x": [1, 2]}, "$remove": {"x": 1}}
    )
    assert admin.properties("user-1")["x"] == [2]

    # The SDK's token never lands in the profile.
    assert "token" not in admin.properties("user-1")
    found = admin.profile("user-1")
    assert found is not None and found["distinct_id"] == "user-1" and found["ids"] == ["user-1"]

    ch.track("user-1", "Still Here")
    ch.people_delete("user-1")
    assert admin.profile("user-1") is None
    # Deleting a profile keeps the person's events.
    assert [e["name"] for e in admin.events(distinct_id="user-1")] == ["Still Here"]


def test_people_operations_through_buffered_consumer_apply_in_order(server) -> None:
    url, admin = server
    consumer = BufferedConsumer(api_host=url)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    ch.people_set("user-9", {"level": 1, "name": "first"})
    ch.people_increment("user-9", {"level": 1})
    ch.people_set("user-9", {"name": "second"})
    ch.people_increment("user-9", {"level": 10})
    ch.people_unset("user-9", ["gone"])
    ch.people_set("user-10", {"other": True})
    assert admin.profile("user-9") is None  # buffered
    assert consumer.flush() is True
    assert admin.properties("user-9") == {"level": 12, "name": "second"}
    assert admin.properties("user-10") == {"other": True}


# -- /alias ------------------------------------------------------------------


def test_alias_merges_the_anonymous_id_into_the_known_person(server) -> None:
    url, admin = server
    ch = Cohorly("tok_shop", api_host=url)
    ch.track("anon-1", "Viewed Page", {"page": "/"})
    ch.track("anon-1", "Added To Cart")
    ch.people_set("anon-1", {"utm": "ad", "name": "anonymous"})
    ch.people_set("user-1", {"name": "Ada"})
    ch.track("user-1", "Purchased")
    ch.track("someone-else", "Purchased")

    ch.alias("anon-1", "user-1")
    ch.alias("anon-1", "user-1")  # the same link again is still a success

    for id_ in ("anon-1", "user-1"):
        person = admin.profile(id_)
        assert person is not None
        assert person["distinct_id"] == "user-1"
        assert sorted(person["ids"]) == ["anon-1", "user-1"]
        # The known id's values win; the anonymous id's fill the keys it lacks.
        assert person["properties"] == {"name": "Ada", "utm": "ad"}

    for id_ in ("user-1", "anon-1"):
        found = admin.events(distinct_id=id_)
        assert [e["name"] for e in found] == ["Viewed Page", "Added To Cart", "Purchased"]
        # Each event keeps the id it was sent with.
        assert [e["distinct_id"] for e in found] == ["anon-1", "anon-1", "user-1"]

    # After the alias, an update addressed to the anonymous id reaches the person.
    ch.people_set("anon-1", {"plan": "pro"})
    assert admin.properties("user-1") == {"name": "Ada", "utm": "ad", "plan": "pro"}


def test_alias_conflict_is_a_delivered_400(server) -> None:
    url, admin = server
    ch = Cohorly("tok_shop", api_host=url, consumer=Consumer(api_host=url, retry_limit=0))
    ch.people_set("user-1", {"name": "Ada"})
    ch.alias("anon-1", "user-1")
    with pytest.raises(CohorlyException, match="status=400"):
        ch.alias("anon-1", "user-2")  # already belongs to another person
    with pytest.raises(CohorlyException, match="status=400"):
        ch.alias("same", "same")
    person = admin.profile("anon-1")
    assert person is not None and sorted(person["ids"]) == ["anon-1", "user-1"]
    assert admin.profile("user-2") is None


def test_alias_through_buffered_consumer(server) -> None:
    url, admin = server
    consumer = BufferedConsumer(api_host=url)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    ch.people_set("user-5", {"name": "Bo"})
    ch.alias("anon-5", "user-5")
    ch.alias("anon-6", "user-5")
    ch.track("anon-6", "Opened App")
    assert consumer.flush() is True
    person = admin.profile("anon-5")
    assert person is not None
    assert person["distinct_id"] == "user-5"
    assert sorted(person["ids"]) == ["anon-5", "anon-6", "user-5"]
    assert [e["distinct_id"] for e in admin.events(distinct_id="user-5")] == ["anon-6"]


# -- idempotency and limits --------------------------------------------------


def test_resent_batch_with_the_same_insert_ids_is_stored_once(unlimited_server) -> None:
    url, admin = unlimited_server
    consumer = BufferedConsumer(api_host=url)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    fixed = [f"order-{i}" for i in range(5)]

    def send(round_: int, ids: list[str]) -> None:
        for i, insert_id in enumerate(ids):
            ch.track("user-1", "Order Completed", {"$insert_id": insert_id, "n": i, "round": round_})
        assert consumer.flush() is True

    send(1, fixed)
    send(2, fixed)  # the same batch re-sent (new `time`, new round)
    stored = admin.events()
    assert sorted(e["insert_id"] for e in stored) == sorted(fixed)
    # The first copy is the one kept.
    assert {e["properties"]["round"] for e in stored} == {1}

    send(3, [*fixed, "order-5", "order-5"])  # old ids, one new one twice in the batch
    stored = admin.events()
    assert len(stored) == 6
    assert sorted(e["insert_id"] for e in stored) == sorted([*fixed, "order-5"])
    assert admin.metric('dialgate_events_stored_total{dialect="cohorly",project="shop"}') == 6
    assert admin.metric('dialgate_events_deduplicated_total{dialect="cohorly",project="shop"}') == 11


def test_oversized_batch_is_halved_after_a_delivered_413(unlimited_server) -> None:
    url, admin = unlimited_server
    consumer = BufferedConsumer(max_size=50, api_host=url, request_timeout=30)
    ch = Cohorly("tok_shop", api_host=url, consumer=consumer)
    blob = "x" * 30_000
    for i in range(50):  # 50 x ~30 KB: about 1.5 MB, over the 1 MB body cap
        ch.track("user-big", "Big Event", {"i": i, "blob": blob})
    # The 50th event triggered the send; a reset instead of a 413 would have
    # left the queue in a backoff window and flush() would say False.
    assert consumer.flush() is True
    stored = admin.events()
    assert sorted(e["properties"]["i"] for e in stored) == list(range(50))
    assert all(e["properties"]["blob"] == blob for e in stored)
    # The first attempt really was refused with 413.
    assert admin.metric('dialgate_rejections_total{dialect="cohorly",reason="too_large"}') >= 1


def test_single_oversized_event_gets_its_413(server) -> None:
    url, admin = server
    ch = Cohorly("tok_shop", api_host=url, consumer=Consumer(api_host=url, retry_limit=0, request_timeout=30))
    with pytest.raises(CohorlyException, match="status=413"):
        ch.track("user-big", "Huge", {"blob": "x" * (2 * 1024 * 1024)})
    ch.track("user-big", "Small")  # the server is still fine afterwards
    assert [e["name"] for e in admin.events()] == ["Small"]
