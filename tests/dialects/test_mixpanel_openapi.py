"""Mixpanel's document: what the SDKs send is valid, in each encoding the
dialect reads (dialects/mixpanel_openapi.py)."""

from __future__ import annotations

from dialects.mixpanel import Mixpanel
from gateway.openapi import document
from tests.dialects.openapi_bodies import body_schema, param_schema

# As the python SDK 5.x sends them (tests/dialects/test_mixpanel_python_sdk.py drives the real one).
EVENT = {"event": "Signed up", "properties": {"token": "mp_shop", "distinct_id": "u1", "time": 1751600000.123,
                                              "$insert_id": "a1b2", "mp_lib": "python", "plan": "pro"}}
PROFILE = {"$token": "mp_shop", "$distinct_id": "u1", "$time": 1751600000123, "$set": {"plan": "pro"}}
GROUP = {"$token": "mp_shop", "$group_key": "company", "$group_id": "acme", "$union": {"tags": ["a"]}}


def test_what_the_sdks_send_is_valid() -> None:
    assert body_schema(Mixpanel, "/track").is_valid([EVENT, EVENT])
    assert body_schema(Mixpanel, "/engage").is_valid(PROFILE)
    assert body_schema(Mixpanel, "/groups").is_valid([GROUP])
    alias = {"event": "$create_alias", "properties": {"alias": "a", "distinct_id": "u1", "token": "mp_shop"}}
    assert body_schema(Mixpanel, "/alias").is_valid(alias)
    # /import takes events without a token (the credentials name the project).
    assert body_schema(Mixpanel, "/import").is_valid([{"event": "e", "properties": {"time": 1}}])
    assert not body_schema(Mixpanel, "/track").is_valid({"event": "e", "properties": {"time": 1}})


def test_every_encoding_is_described() -> None:
    doc = document(Mixpanel(Mixpanel.Config(), {}))
    assert doc is not None
    post = doc["paths"]["/track"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}
    assert post["requestBody"]["required"] is False
    data = param_schema(Mixpanel, "/track", "get", "data")
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"] == {"$ref": "#/components/schemas/MixpanelEvent"}
    assert set(post["responses"]["200"]["content"]) == {"application/json", "text/plain"}
    assert [p["name"] for p in post["parameters"] if p["in"] == "header"] == ["Content-Encoding"]
    assert not [p for p in doc["paths"]["/engage"]["post"]["parameters"] if p["in"] == "header"]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["basic"] == {"type": "http", "scheme": "basic", "description": schemes["basic"]["description"],
                                "x-dialgate-credential": "mixpanel_secrets"}
