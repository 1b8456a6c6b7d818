"""The dialects' OpenAPI documents: the checked-in ones are what the code
makes, and the gateway serves those of its enabled dialects, on the public
listener, without any credential (gateway/openapi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from dialects.base import Dialect
from dialects.inslytic import Inslytic
from gateway.app import build_app
from gateway.openapi import document, encode, fill, main, shipped
from gateway.registry import discover
from tests.support import PROJECTS, free_port, gateway, lifespan, settings_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi"
REGENERATE = "out of date: run `python -m gateway.openapi --write docs/openapi`"
SHIPPED = ("client", "cohorly", "collect", "inslytic", "mixpanel")
SECRETS = [value for project in PROJECTS for key, values in project.items() if key != "name"
           for value in (values if isinstance(values, list) else [values])
           for value in ([value["token"]] if isinstance(value, dict) else [value])]


def test_the_checked_in_documents_are_what_the_code_makes() -> None:
    docs = shipped(discover())
    assert sorted(docs) == sorted(p.stem for p in DOCS.glob("*.json")) == list(SHIPPED)
    for name, doc in docs.items():
        assert (DOCS / f"{name}.json").read_bytes() == encode(doc), f"docs/openapi/{name}.json: {REGENERATE}"


def test_write_makes_the_checked_in_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--write", str(tmp_path / "out")]) == 0
    for name in SHIPPED:
        assert (tmp_path / "out" / f"{name}.json").read_bytes() == (DOCS / f"{name}.json").read_bytes()
    assert "inslytic.json" in capsys.readouterr().out


def test_documents_are_openapi_3_1_with_every_operation_answered() -> None:
    for name, doc in shipped(discover()).items():
        assert doc["openapi"] == "3.1.0" and doc["info"]["title"], name
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                assert operation["responses"], (name, path, method)
                assert operation["operationId"].startswith(f"{name}_{method}_")


@pytest.mark.anyio
async def test_served_for_enabled_dialects_only_and_without_credentials(sqlite_backend: dict[str, str]) -> None:
    settings = settings_for(sqlite_backend, dialects={"inslytic": {"enabled": False, "max_body_bytes": 1024}})
    async with gateway(settings) as client:
        for name in SHIPPED:
            reply = await client.get(f"/openapi/{name}.json")
            if name == "inslytic":
                assert reply.status_code == 404
                continue
            assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
            assert reply.content == (DOCS / f"{name}.json").read_bytes()
            assert not [secret for secret in SECRETS if secret in reply.text]
        assert (await client.post("/openapi/cohorly.json")).status_code == 405


@pytest.mark.anyio
async def test_served_on_the_public_listener_when_admin_has_its_own(sqlite_backend: dict[str, str]) -> None:
    settings = settings_for(sqlite_backend, admin={"bind": f"127.0.0.1:{free_port()}"})
    app = build_app(settings)
    async with lifespan(app):
        public = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.admin), base_url="http://admin")
        async with public, admin:
            assert (await public.get("/openapi/client.json")).status_code == 200
            assert (await admin.get("/openapi/client.json")).status_code == 404


def test_documents_state_the_default_limits_whatever_the_configuration() -> None:
    small = document(Inslytic(Inslytic.Config(max_body_bytes=10, max_events=5), {}))
    assert small == json.loads((DOCS / "inslytic.json").read_bytes())


def test_fill_lists_the_valid_credentials_where_the_document_marks_them() -> None:
    doc = shipped(discover())["collect"]
    filled = fill(json.loads(encode(doc)), {"collect_sources.site": ["1234"], "collect_sources.token": ["s"]})
    params = {p["name"]: p["schema"] for p in filled["paths"]["/events"]["get"]["parameters"]}
    assert params["tc_s"]["enum"] == ["1234"] and params["token"]["enum"] == ["s"]
    assert "enum" not in json.dumps(doc["paths"]["/events"]["get"]["parameters"])


def test_a_dialect_that_does_not_describe_itself_has_no_document() -> None:
    class Silent(Inslytic):
        def describe(self) -> None:
            return None

    silent: Dialect = Silent(Inslytic.Config(), {})
    assert document(silent) is None
