"""The browser SDK (npm `mixpanel-browser`, unmodified) in headless Chromium
against a live gateway.

The test installs the SDK and `playwright-core` from npm into a temporary
folder, serves a page of its own on a loopback port (so the SDK talks to the
gateway cross-origin, with credentials, as on a real site), drives Debian's
`chromium` through tests/dialects/browser/driver.js and reads back what landed
through the admin API. The SDK keeps its default wire format for a host that
is not Mixpanel's: POST form `data=<base64 JSON array>` to `track/`, `engage/`
with `verbose=1&ip=1&_=<ms>`, batched; on page hide a `navigator.sendBeacon`
of the queue as `text/plain`, and the same events again on the next load
(the SDK counts on the server's `$insert_id` dedup).

Outside CI=true the test skips, saying why, when node, npm or chromium is
missing or the browser cannot start; under CI=true that fails.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CI
from tests.support import ADMIN, PROJECTS, free_port, live_server, settings_for

SDK = "mixpanel-browser@2.83.0"
DRIVER = "playwright-core@1.65.2"
HERE = Path(__file__).parent / "browser"
TOKEN = "mp_tok_shop"
MP_PROJECTS = [{**PROJECTS[0], "mixpanel_tokens": [TOKEN]}, PROJECTS[1]]


def cannot(why: str) -> None:
    if CI:
        pytest.fail(f"the browser SDK test cannot run: {why}; CI=true requires it", pytrace=False)
    pytest.skip(f"the browser SDK test cannot run here: {why}")


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mixpanel-browser and playwright-core from npm, in a folder of the test's own."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            cannot(f"`{tool}` is not on PATH")
    if shutil.which("chromium") is None:
        cannot("Debian's `chromium` is not installed (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("browser-sdk")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(folder), SDK, DRIVER],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        cannot(f"npm install {SDK} {DRIVER} failed: {done.stderr[-2000:]}")
    return folder / "node_modules"


class Site:
    """The page the SDK runs on, served from its own loopback port."""

    def __init__(self, modules: Path) -> None:
        files = {
            "/page.html": ((HERE / "page.html").read_bytes(), "text/html"),
            "/blank.html": (b"<!doctype html><title>elsewhere</title>", "text/html"),
            "/mixpanel.js": (
                (modules / "mixpanel-browser" / "dist" / "mixpanel.umd.js").read_bytes(),
                "application/javascript",
            ),
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, kind = files.get(self.path.split("?")[0], (b"not found", "text/plain"))
                self.send_response(200 if kind != "text/plain" else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Browser:
    """One run of driver.js: visits pages in one browser context (so the
    SDK's cookie and localStorage persist across visits) and stops after
    each visit marked `pause` until told to go on."""

    def __init__(self, modules: Path, gateway: str, visits: list[dict[str, Any]], folder: Path) -> None:
        plan = folder / "plan.json"
        plan.write_text(json.dumps({
            "chromium": shutil.which("chromium"), "modules": str(modules), "gateway": gateway, "visits": visits,
        }))
        self.process = subprocess.Popen(
            ["node", str(HERE / "driver.js"), str(plan)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its chromium with it, on close
        )

    def next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            _, err = self.process.communicate(timeout=30)
            if "browserType.launch" in err:
                cannot(f"chromium did not start: {err[-2000:]}")
            raise AssertionError(f"driver.js failed: {err[-4000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=30)


class Admin:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def events(self, **params: Any) -> list[dict[str, Any]]:
        reply = self.client.get("/admin/v1/projects/shop/events", params={"limit": 1000, **params})
        assert reply.status_code == 200, reply.text
        return reply.json()["events"]  # type: ignore[no-any-return]

    def named(self, name: str) -> list[dict[str, Any]]:
        return self.events(name=name)

    def profile(self, id_: str) -> dict[str, Any] | None:
        reply = self.client.get(f"/admin/v1/projects/shop/profiles/{id_}")
        if reply.status_code == 404:
            return None
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    def wait_for(self, name: str, count: int, seconds: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while len(found := self.named(name)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return found


def init(gateway: str, flush_ms: int) -> str:
    """The page's call of `mixpanel.init`: only the host changes (the SDK
    then picks its base64 payload format itself)."""
    return (f"mixpanel.init({json.dumps(TOKEN)}, {{api_host: {json.dumps(gateway)}, "
            f"batch_flush_interval_ms: {flush_ms}}});")


def script(body: str) -> str:
    return f"(async () => {{ {body} }})()"


def sent(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of one SDK request, decoded as the SDK encoded them."""
    form = urllib.parse.parse_qs(request["body"])
    return json.loads(base64.b64decode(form["data"][0]))  # type: ignore[no-any-return]


def to_track(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if urllib.parse.urlparse(r["url"]).path == "/track/"]


@pytest.fixture
def gateway(backend: dict[str, str]) -> Iterator[tuple[str, Admin]]:
    with live_server(settings_for(backend, projects=MP_PROJECTS)) as url, httpx.Client(
        base_url=url, headers=ADMIN
    ) as client:
        yield url, Admin(client)


def test_browser_sdk_track_identify_alias_people_reset_beacon(
    gateway: tuple[str, Admin], modules: Path, tmp_path: Path
) -> None:
    url, admin = gateway
    with Site(modules) as site:
        page, blank = f"{site.url}/page.html", f"{site.url}/blank.html"
        visits = [
            # 1. an anonymous visitor browses (one batch), logs in, gets a profile property
            {"url": page, "pause": True, "script": script(
                init(url, 300)
                + "const anon = mixpanel.get_distinct_id();"
                + "for (let i = 0; i < 5; i++) mixpanel.track('Viewed Item', {item: i, page: 'home'});"
                + "mixpanel.identify('user-42');"
                + "mixpanel.people.set({plan: 'pro', seats: 3});"
                + "mixpanel.track('Bought', {amount: 9.5, currency: 'EUR'});"
                + "return {anon, device: mixpanel.get_property('$device_id'), now: Date.now()};"
            )},
            # 2. the logged-in user gets an alias
            {"url": page, "pause": True, "script": script(
                init(url, 300) + "mixpanel.alias('alias-42'); return mixpanel.get_distinct_id();"
            )},
            # 3. logout: a new anonymous visitor on the same browser
            {"url": page, "pause": True, "script": script(
                init(url, 300) + "mixpanel.reset(); mixpanel.track('After Reset');"
                + "return mixpanel.get_distinct_id();"
            )},
            # 4. events queued, then the page is hidden: one sendBeacon
            {"url": page, "pause": True, "leave_to": blank, "script": script(
                init(url, 3000)
                + "for (let n = 0; n < 3; n++) mixpanel.track('Left Page', {n});"
                + "await new Promise((resolve) => setTimeout(resolve, 500));"
                + "return mixpanel.get_distinct_id();"
            )},
            # 5. the next load sends the beaconed events again
            {"url": page, "pause": True, "script": script(
                "const beacons = JSON.parse(localStorage.getItem('test_beacons') || '[]');"
                + init(url, 300) + "return beacons;"
            )},
        ]
        browser = Browser(modules, url, visits, tmp_path)
        try:
            # 1. batched track over XHR, $identify, people.set
            step = browser.next()
            anon, device, before = step["result"]["anon"], step["result"]["device"], step["result"]["now"]
            assert anon == f"$device:{device}"
            tracks = to_track(step["requests"])
            assert tracks and all(r["method"] == "POST" and r["status"] == 200 for r in tracks), tracks
            assert all(r["content_type"] == "application/x-www-form-urlencoded" for r in tracks)
            query = urllib.parse.parse_qs(urllib.parse.urlparse(tracks[0]["url"]).query)
            assert query["verbose"] == ["1"] and query["ip"] == ["1"]
            viewed = sorted(admin.named("Viewed Item"), key=lambda e: e["properties"]["item"])
            assert [e["properties"]["item"] for e in viewed] == [0, 1, 2, 3, 4]
            for event in viewed:
                assert event["source"] == "mixpanel"
                assert event["distinct_id"] == anon
                assert event["properties"]["page"] == "home"
                assert event["properties"]["mp_lib"] == "web"
                assert len(event["insert_id"]) >= 16
                # float seconds from the browser, stored to the millisecond of the page's clock
                assert before - 5000 <= event["time"] <= before + 1000, (event["time"], before)
            assert "token" not in viewed[0]["properties"]
            assert [e["properties"]["currency"] for e in admin.named("Bought")] == ["EUR"]
            assert admin.named("$identify") == []
            person = admin.profile("user-42")
            assert person is not None
            assert set(person["ids"]) >= {anon, "user-42"}
            assert person["properties"]["plan"] == "pro" and person["properties"]["seats"] == 3
            # the anonymous events and the logged-in ones are one person's
            names = {e["name"] for e in admin.events(distinct_id="user-42")}
            assert names == {"Viewed Item", "Bought"}, names
            browser.go_on()

            # 2. alias: a $create_alias event becomes a link, not an event
            step = browser.next()
            assert step["result"] in ("user-42", "alias-42")
            assert admin.named("$create_alias") == []
            person = admin.profile("alias-42")
            assert person is not None and set(person["ids"]) >= {anon, "user-42", "alias-42"}
            assert person["properties"]["plan"] == "pro"
            browser.go_on()

            # 3. reset: a new anonymous id, not linked to the user
            step = browser.next()
            fresh = step["result"]
            assert fresh.startswith("$device:") and fresh != anon
            [after] = admin.named("After Reset")
            assert after["distinct_id"] == fresh
            assert "After Reset" not in {e["name"] for e in admin.events(distinct_id="user-42")}
            alone = admin.profile(fresh)
            assert alone is None or "user-42" not in alone["ids"]
            browser.go_on()

            # 4. page hide: the queue leaves by sendBeacon (a string body: text/plain)
            # and is stored; nothing else can have sent it (the page left before its 3 s flush)
            step = browser.next()
            assert to_track(step["requests"]) == []
            left = admin.wait_for("Left Page", 3)
            assert sorted(e["properties"]["n"] for e in left) == [0, 1, 2]
            assert {e["distinct_id"] for e in left} == {fresh}
            browser.go_on()

            # 5. the next load re-sends the same events (once their 2 x 3 s are past): stored once
            step = browser.next()
            [beacon] = step["result"]
            assert beacon["queued"] is True
            assert urllib.parse.urlparse(beacon["url"]).path == "/track/"
            beaconed = sent(beacon)
            assert sorted(e["properties"]["n"] for e in beaconed) == [0, 1, 2]
            resent = [e for r in to_track(step["requests"]) for e in sent(r) if e["event"] == "Left Page"]
            assert sorted(e["properties"]["$insert_id"] for e in resent) == sorted(
                e["properties"]["$insert_id"] for e in beaconed
            )
            assert all(r["status"] == 200 for r in to_track(step["requests"])), to_track(step["requests"])
            assert len(admin.named("Left Page")) == 3
            browser.go_on()
            assert browser.process.wait(timeout=30) == 0
        finally:
            browser.close()
