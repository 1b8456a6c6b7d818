"""Cohorly's document accepts what its SDKs send and refuses what the
dialect refuses (dialects/cohorly_openapi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialects.cohorly import Cohorly
from tests.dialects.openapi_bodies import body_schema

PAYLOADS = Path(__file__).parent / "payloads" / "cohorly"


@pytest.mark.parametrize("path", sorted(PAYLOADS.glob("*.json")), ids=lambda p: p.stem)
def test_what_the_sdks_send_is_valid(path: Path) -> None:
    body = json.loads(path.read_text())
    endpoint = "engage" if "engage" in path.stem else "alias" if "alias" in path.stem else "track"
    assert body_schema(Cohorly, f"/{endpoint}").is_valid(body)


@pytest.mark.parametrize("event", [
    {"event": "", "properties": {"distinct_id": "u"}},
    {"event": "e", "properties": {"distinct_id": ""}},
    {"event": "e", "properties": {"distinct_id": "u", "time": "1751600000000"}},
    {"event": "e", "properties": {"distinct_id": "u", "$insert_id": "x" * 256}},
    [],
])
def test_what_the_dialect_refuses_on_track_is_invalid(event: object) -> None:
    assert not body_schema(Cohorly, "/track").is_valid(event)


def test_engage_verbs_have_their_types() -> None:
    schema = body_schema(Cohorly, "/engage")
    assert schema.is_valid({"distinct_id": "u", "$add": {"n": 1.5}})
    assert not schema.is_valid({"distinct_id": "u", "$add": {"n": "1"}})
    assert not schema.is_valid({"distinct_id": "u", "$unset": "n"})
