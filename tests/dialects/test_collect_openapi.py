"""The collect endpoint's document accepts every payload generation the
dialect reads, and says the pixel is a GIF (dialects/collect_openapi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialects.collect import Collect
from gateway.openapi import document
from tests.dialects.openapi_bodies import body_schema, param_schema

PAYLOADS = Path(__file__).parent / "payloads" / "collect"


@pytest.mark.parametrize("path", sorted(PAYLOADS.glob("*.json")), ids=lambda p: p.stem)
def test_what_the_tags_send_is_valid(path: Path) -> None:
    body = json.loads(path.read_text())
    endpoint = "/events/batch" if "batch" in body else "/events"
    assert body_schema(Collect, endpoint).is_valid(body)
    assert body_schema(Collect, "/cdp" + endpoint).is_valid(body)


def test_the_pixel_and_its_credentials() -> None:
    doc = document(Collect(Collect.Config(), {}))
    assert doc is not None
    answer = doc["paths"]["/events"]["get"]["responses"]["200"]
    assert list(answer["content"]) == ["image/gif"]
    assert "429" not in doc["paths"]["/events"]["post"]["responses"]
    assert param_schema(Collect, "/events", "get", "tc_s")["x-dialgate-credential"] == "collect_sources.site"
    assert not body_schema(Collect, "/events").is_valid({"context": {"event_timestamp": "soon"}})
