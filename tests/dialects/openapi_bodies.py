"""Request bodies checked against a dialect's OpenAPI document (JSON Schema
2020-12, the document's components resolvable)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs

from dialects.base import Dialect
from gateway.openapi import document


def body_schema(dialect: type[Dialect], path: str, method: str = "post",
                media_type: str = "application/json") -> Any:
    """A validator of `method path`'s request body in `media_type`."""
    doc = document(dialect(dialect.Config(), {}))
    assert doc is not None
    schema = doc["paths"][path][method]["requestBody"]["content"][media_type]["schema"]
    return jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})


def param_schema(dialect: type[Dialect], path: str, method: str, name: str) -> dict[str, Any]:
    doc = document(dialect(dialect.Config(), {}))
    assert doc is not None
    for param in doc["paths"][path][method].get("parameters", []):
        if param["name"] == name:
            return param["schema"]  # type: ignore[no-any-return]
    raise KeyError(name)
