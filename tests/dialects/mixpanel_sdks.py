"""What the tests of the real Mixpanel SDKs share: projects with Mixpanel
credentials, a live gateway, and reads through its admin API."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx

from tests.support import ADMIN, PROJECTS, live_server, settings_for

TOKEN = "mp_shop"
SECRET = "mps_shop"  # a project secret: HTTP Basic user name, empty password
SERVICE_USER = "svc-shop.import"  # a service account: Basic user:secret with ?project_id=
SERVICE_SECRET = "svcsecret_shop"

# The seed projects, with Mixpanel's credentials added (the Cohorly tokens
# stay: both dialects share /track, /engage and /alias).
MIXPANEL_PROJECTS = [
    {
        **PROJECTS[0],
        "mixpanel_tokens": [TOKEN],
        "mixpanel_secrets": [SECRET, SERVICE_SECRET],
    },
    {**PROJECTS[1], "mixpanel_tokens": ["mp_blog"], "mixpanel_secrets": ["mps_blog"]},
]

# The live server sees one client IP; lift the per-IP limits for the many
# requests an SDK run makes (Cohorly's window also counts requests on the
# paths it shares with Mixpanel).
_LIFTED = {"rate_limit": {"requests": 100000, "per_seconds": 1}}
UNLIMITED = {"mixpanel": _LIFTED, "cohorly": _LIFTED}

# Properties an SDK stamps on every event, kept as sent or renamed by the
# dialect; the tests compare what the caller passed apart from them.
SDK_STAMPS = frozenset({"mp_lib", "$lib", "$lib_version", "mp_sent_by_lib_version"})
# Properties the dialect lifts into the event's own fields.
LIFTED = ("token", "distinct_id", "time", "$insert_id")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def caller_properties(event: dict[str, Any]) -> dict[str, Any]:
    """The event's properties without the SDK's stamps, after checking that
    no lifted key was left in them."""
    props: dict[str, Any] = event["properties"]
    for key in LIFTED:
        assert key not in props, (key, event)
    return {k: v for k, v in props.items() if k not in SDK_STAMPS}


class Admin:
    """Reads through the admin API of the live server."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def events(self, project: str = "shop", **params: Any) -> list[dict[str, Any]]:
        reply = self.client.get(f"/admin/v1/projects/{project}/events", params={"limit": 1000, **params})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["next"] is None
        return body["events"]  # type: ignore[no-any-return]

    def named(self, name: str, project: str = "shop") -> list[dict[str, Any]]:
        return [e for e in self.events(project) if e["name"] == name]

    def profile(self, id_: str, project: str = "shop") -> dict[str, Any] | None:
        reply = self.client.get(f"/admin/v1/projects/{project}/profiles/{id_}")
        if reply.status_code == 404:
            return None
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    def properties(self, id_: str, project: str = "shop") -> dict[str, Any]:
        found = self.profile(id_, project)
        assert found is not None, f"no profile for {id_}"
        return found["properties"]  # type: ignore[no-any-return]

    def group(self, key: str, id_: str, project: str = "shop") -> dict[str, Any] | None:
        reply = self.client.get(f"/admin/v1/projects/{project}/groups/{key}/{id_}")
        if reply.status_code == 404:
            return None
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        assert (body["group_key"], body["group_id"]) == (key, id_)
        return body

    def group_properties(self, key: str, id_: str) -> dict[str, Any]:
        found = self.group(key, id_)
        assert found is not None, f"no group {key}/{id_}"
        return found["properties"]  # type: ignore[no-any-return]

    def metric(self, line_start: str) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_for_events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events()
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@contextlib.contextmanager
def mixpanel_gateway(backend: dict[str, str]) -> Iterator[tuple[str, Admin]]:
    """A live gateway that knows the Mixpanel credentials above; yields its
    URL and the admin reader."""
    settings = settings_for(backend, projects=MIXPANEL_PROJECTS, dialects=UNLIMITED)
    with live_server(settings) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=30) as client:
        yield url, Admin(client)
