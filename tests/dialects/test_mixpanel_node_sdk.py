"""Mixpanel's Node SDK (npm `mixpanel`, unmodified) against a live gateway.

The package is installed from the registry into a temporary folder, once per
session, and driven by tests/dialects/sdk/mixpanel_node_driver.js: each call
gets a callback and the driver prints the error each callback received (None
when the SDK saw success). The SDK reaches the gateway with `host`
("127.0.0.1:PORT") and `protocol: "http"`; single calls go out as GET
`?data=<base64>`, batches as POST form bodies of raw base64. With `verbose`
off the SDK accepts only a body of exactly `1`; with it on, JSON `status: 1`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CI
from tests.dialects.mixpanel_sdks import (
    SDK_STAMPS,
    SECRET,
    TOKEN,
    Admin,
    caller_properties,
    mixpanel_gateway,
    now_ms,
)
from tests.faults.proxy import TcpProxy

NODE_SDK = "mixpanel@0.24.0"
DRIVER = Path(__file__).parent / "sdk" / "mixpanel_node_driver.js"


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        message = "node and npm are needed to install the npm `mixpanel` package"
        if CI:
            pytest.fail(message + "; CI=true requires them", pytrace=False)
        pytest.skip(message + "; they are not on PATH")
    folder = tmp_path_factory.mktemp("mixpanel-node")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--prefix", str(folder), NODE_SDK],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder / "node_modules"


def call(fn: str, *args: Any) -> dict[str, Any]:
    return {"fn": fn, "args": list(args)}


def date(ms: int) -> dict[str, int]:
    """A JavaScript Date in the driver."""
    return {"$date": ms}


def drive(
    node_modules: Path,
    url: str,
    calls: list[dict[str, Any]],
    *,
    verbose: bool = False,
    wait: bool = True,
    token: str = TOKEN,
) -> Any:
    """Run the calls through the SDK against `url`; the errors, one a call
    (or the running process when not `wait`)."""
    config = {"host": url.removeprefix("http://"), "protocol": "http", "verbose": verbose, "key": SECRET}
    process = subprocess.Popen(
        ["node", str(DRIVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(node_modules)},
        text=True,
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps({"token": token, "config": config, "calls": calls}))
    process.stdin.close()
    if not wait:
        return process
    return finish(process)


def finish(process: subprocess.Popen[str]) -> list[str | None]:
    assert process.stdout is not None and process.stderr is not None
    with process:  # closes the pipes
        out, err = process.stdout.read(), process.stderr.read()
        assert process.wait(timeout=60) == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def server(backend) -> Iterator[tuple[str, Admin]]:
    with mixpanel_gateway(backend) as found:
        yield found


def stamped_node(event: dict[str, Any], batched: bool) -> None:
    """Single calls carry the SDK's stamps; its batches add only the token."""
    props = event["properties"]
    if batched:
        assert not SDK_STAMPS & props.keys()
    else:
        assert props.get("mp_lib", props.get("$lib")) == "node"
        assert props["$lib_version"] == "0.24.0"
    assert (event["source"], event["project"]) == ("mixpanel", "shop")


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
def test_track_track_batch_import_and_import_batch(server, node_modules: Path, verbose: bool) -> None:
    url, admin = server
    before = now_ms()
    errors = drive(
        node_modules,
        url,
        [
            # No time, no $insert_id: the receipt time, stored as sent.
            call("track", "Signed Up", {"distinct_id": "user-1", "plan": "pro", "seats": 3}),
            call("track", "Signed Up", {"distinct_id": "user-1", "plan": "pro", "seats": 3}),
            # A Date becomes milliseconds; a number is passed through (seconds here).
            call("track", "Clicked", {"distinct_id": "user-1", "time": date(1_765_000_000_123)}),
            call("track", "Seconds", {"distinct_id": "user-1", "time": 1_765_000_001}),
            call("track", "Anonymous", {"page": "/"}),  # no distinct_id at all
            call(
                "track_batch",
                [
                    {"event": "Batch A", "properties": {"distinct_id": "user-2", "time": date(1_765_000_002_000)}},
                    {"event": "Batch B", "properties": {"distinct_id": "user-2", "$insert_id": "b-1", "k": "a+b/c="}},
                ],
            ),
            call("import", "Old Purchase", date(1_600_000_000_000), {"distinct_id": "user-3", "amount": 9.5}),
            call(
                "import_batch",
                [
                    {"event": "Old A", "properties": {"distinct_id": "user-3", "time": 1_500_000_000}},
                    {"event": "Old B", "properties": {"distinct_id": "user-3", "time": date(1_500_000_001_500)}},
                ],
            ),
        ],
        verbose=verbose,
    )
    after = now_ms()
    assert errors == [None] * 8

    stored = admin.events()
    names = [e["name"] for e in stored]
    sent = ["Signed Up", "Signed Up", "Clicked", "Seconds", "Anonymous", "Batch A", "Batch B"]
    assert sorted(names) == sorted([*sent, "Old Purchase", "Old A", "Old B"])
    for event in stored:
        stamped_node(event, batched=event["name"] in ("Batch A", "Batch B", "Old A", "Old B"))
    by_name = {e["name"]: e for e in stored}

    # Both id-less copies are kept, each as sent, at its receipt time.
    twins = admin.named("Signed Up")
    assert len(twins) == 2
    for event in twins:
        assert event["insert_id"] is None
        assert event["distinct_id"] == "user-1"
        assert caller_properties(event) == {"plan": "pro", "seats": 3}
        assert before // 1000 <= event["time"] // 1000 <= after // 1000

    assert by_name["Clicked"]["time"] == 1_765_000_000_123
    assert by_name["Seconds"]["time"] == 1_765_000_001_000
    assert by_name["Anonymous"]["distinct_id"] in (None, "")
    assert caller_properties(by_name["Anonymous"]) == {"page": "/"}
    assert by_name["Batch A"]["time"] == 1_765_000_002_000
    assert by_name["Batch A"]["distinct_id"] == "user-2"
    # The POST body's raw base64 keeps its `+` (a form parser would make it a space).
    assert caller_properties(by_name["Batch B"]) == {"k": "a+b/c="}
    assert by_name["Batch B"]["insert_id"] == "b-1"
    assert before // 1000 <= by_name["Batch B"]["time"] // 1000 <= after // 1000
    assert by_name["Old Purchase"]["time"] == 1_600_000_000_000
    assert caller_properties(by_name["Old Purchase"]) == {"amount": 9.5}
    assert by_name["Old A"]["time"] == 1_500_000_000_000
    assert by_name["Old B"]["time"] == 1_500_000_001_500


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
def test_every_people_call(server, node_modules: Path, verbose: bool) -> None:
    url, admin = server
    user = "user-1"
    errors = drive(
        node_modules,
        url,
        [
            call("people.set", user, {"name": "Ada", "plan": "free", "tags": ["a"]}),
            call("people.set", user, "plan", "team", {"$ignore_time": True, "$time": date(1_765_000_000_000)}),
            call("people.set_once", user, {"plan": "pro", "first_seen": "2024-01-01"}),
            call("people.set_once", user, "origin", "ad"),
            call("people.increment", user, {"logins": 1, "score": 2.5}),
            call("people.increment", user, "logins"),  # by 1
            call("people.increment", user, "score", -1),
            call("people.append", user, {"tags": "b"}),
            call("people.append", user, "visits", "/home"),
            call("people.union", user, {"tags": ["b", "c", "d"]}),
            call("people.remove", user, {"tags": "d"}),
            call("people.unset", user, ["first_seen", "never_set"]),
            call("people.unset", user, "origin"),
            call("people.track_charge", user, 9.5, {"sku": "A-1"}),
            call("people.set", "user-2", {"name": "Bo"}, {"$ip": "0"}),
            call("people.track_charge", "user-2", 5),
            call("people.clear_charges", "user-2"),  # $set {$transactions: []}
            call("people.set", "user-3", {"name": "Gone"}),
            call("people.delete_user", "user-3"),  # $delete: ""
        ],
        verbose=verbose,
    )
    assert errors == [None] * 19
    assert admin.properties(user) == {
        "name": "Ada",
        "plan": "team",
        "tags": ["a", "b", "c"],
        "logins": 2,
        "score": 1.5,
        "visits": ["/home"],
        "$transactions": [{"sku": "A-1", "$amount": 9.5}],
    }
    assert admin.properties("user-2") == {"name": "Bo", "$transactions": []}
    assert admin.profile("user-3") is None


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
def test_every_groups_call(server, node_modules: Path, verbose: bool) -> None:
    url, admin = server
    errors = drive(
        node_modules,
        url,
        [
            call("groups.set", "company", "acme", {"name": "Acme", "tier": "gold", "products": ["anvil"]}),
            call("groups.set", "company", "acme", "industry", "widgets"),
            call("groups.set_once", "company", "acme", {"tier": "silver", "founded": 1999}),
            call("groups.union", "company", "acme", {"products": ["rocket", "anvil", "magnet"]}),
            call("groups.remove", "company", "acme", {"products": "magnet"}),
            call("groups.unset", "company", "acme", "founded"),
            call("groups.set", "company", "gone", {"name": "Gone"}),
            call("groups.delete_group", "company", "gone"),
        ],
        verbose=verbose,
    )
    assert errors == [None] * 8
    assert admin.group_properties("company", "acme") == {
        "name": "Acme",
        "tier": "gold",
        "industry": "widgets",
        "products": ["anvil", "rocket"],
    }
    assert admin.group("company", "gone") is None
    assert admin.profile("acme") is None


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
def test_alias(server, node_modules: Path, verbose: bool) -> None:
    url, admin = server
    errors = drive(
        node_modules,
        url,
        [
            call("people.set", "user-1", {"name": "Ada"}),
            call("track", "Viewed Page", {"distinct_id": "anon-1"}),
            call("alias", "user-1", "anon-1"),  # distinct_id, alias: a $create_alias event
            call("people.set", "anon-1", {"plan": "pro"}),  # reaches the person now
        ],
        verbose=verbose,
    )
    assert errors == [None] * 4
    for id_ in ("anon-1", "user-1"):
        person = admin.profile(id_)
        assert person is not None
        assert person["distinct_id"] == "user-1"
        assert sorted(person["ids"]) == ["anon-1", "user-1"]
        assert person["properties"] == {"name": "Ada", "plan": "pro"}
        assert [e["name"] for e in admin.events(distinct_id=id_)] == ["Viewed Page"]
    assert admin.named("$create_alias") == []


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
def test_an_unknown_token_is_an_error_in_the_callback(server, node_modules: Path, verbose: bool) -> None:
    url, admin = server
    calls = [call("track", "Nope", {"distinct_id": "u"}), call("people.set", "u", {"a": 1})]
    errors = drive(node_modules, url, calls, verbose=verbose, token="mp_nobody")
    assert len(errors) == 2
    assert all(e is not None and "Mixpanel Server Error" in e for e in errors), errors
    assert admin.events() == []
    assert admin.profile("u") is None


def test_batch_resent_after_a_lost_answer_is_stored_once(server, node_modules: Path) -> None:
    """The SDK does not retry by itself; its callback gets the error and the
    caller sends the same batch again (the SDK's way to retry). Through a
    proxy that drops the gateway's answer and then resets the connection,
    the first send is stored though the SDK sees an error; the re-send is
    stored once, and id-less events twice, as sent."""
    url, admin = server
    batch = [
        {"event": "Order", "properties": {"distinct_id": "user-1", "$insert_id": f"order-{i}", "n": i}}
        for i in range(3)
    ] + [{"event": "Ping", "properties": {"distinct_id": "user-1", "time": date(1_765_000_000_000)}}]
    host, port = url.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        proxy.mute_after = b"POST /track"
        process = drive(node_modules, f"http://127.0.0.1:{proxy.port}", [call("track_batch", batch)], wait=False)
        stored = admin.wait_for_events(4)
        assert len(stored) == 4
        time.sleep(0.2)
        proxy.reset()
        (error,) = finish(process)
    assert error is not None  # the SDK reported the lost answer
    assert drive(node_modules, url, [call("track_batch", batch)]) == [None]
    stored = admin.events()
    assert sorted(e["properties"]["n"] for e in stored if e["name"] == "Order") == [0, 1, 2]
    pings = admin.named("Ping")
    assert len(pings) == 2 and all(p["insert_id"] is None and p["time"] == 1_765_000_000_000 for p in pings)
    assert admin.metric('dialgate_events_deduplicated_total{dialect="mixpanel",project="shop"}') == 3
