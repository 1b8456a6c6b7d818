"""Inslytic's document accepts what its SDK sends and refuses what the
dialect refuses (dialects/inslytic_openapi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialects.inslytic import Inslytic
from tests.dialects.openapi_bodies import body_schema

PAYLOADS = Path(__file__).parent / "payloads" / "inslytic"
EVENT = {"eventName": "page_viewed", "timestamp": "2026-02-16T10:30:00Z", "anonymousId": "a",
         "sessionId": "", "consentGiven": True}


@pytest.mark.parametrize("path", sorted(PAYLOADS.glob("*.json")), ids=lambda p: p.stem)
def test_what_the_sdk_sends_is_valid(path: Path) -> None:
    assert body_schema(Inslytic, "/v1/ingest").is_valid(json.loads(path.read_text()))


@pytest.mark.parametrize("change", [
    {"eventName": ""}, {"consentGiven": "yes"}, {"deviceType": "watch"}, {"properties": {"n": 1}},
    {"userId": ""},
])
def test_what_the_dialect_refuses_is_invalid(change: dict[str, object]) -> None:
    schema = body_schema(Inslytic, "/v1/ingest")
    assert schema.is_valid({"events": [EVENT]})
    assert not schema.is_valid({"events": [{**EVENT, **change}]})
    assert not schema.is_valid({"events": []})
