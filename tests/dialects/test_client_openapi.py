"""The client API's document: its schemas are the dialect's own Structs,
and accept what the vendor's SDKs send (dialects/client_openapi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialects.client import Client
from gateway.openapi import document
from tests.dialects.openapi_bodies import body_schema

PAYLOADS = Path(__file__).parent / "payloads" / "client"
PATHS = {"alias": "alias", "identify": "identify", "register": "devices", "track": "events"}


@pytest.mark.parametrize("path", sorted(PAYLOADS.glob("*.json")), ids=lambda p: p.stem)
def test_what_the_sdks_send_is_valid(path: Path) -> None:
    endpoint = PATHS[path.stem.split("_")[1]]
    assert body_schema(Client, f"/api/client/{endpoint}").is_valid(json.loads(path.read_text()))


def test_the_schemas_are_the_decoding_structs() -> None:
    doc = document(Client(Client.Config(), {}))
    assert doc is not None
    schemas = doc["components"]["schemas"]
    assert {"AliasBody", "IdentifyBody", "DeviceBody", "EventItem", "UserBlock"} <= set(schemas)
    # identify forbids unknown keys, as the decoder does.
    assert schemas["IdentifyBody"]["additionalProperties"] is False
    assert not body_schema(Client, "/api/client/identify").is_valid({"anonymous_id": "a", "nickname": "x"})
    # events: an array, never a single object.
    assert not body_schema(Client, "/api/client/events").is_valid({"name": "x", "anonymous_id": "a"})
