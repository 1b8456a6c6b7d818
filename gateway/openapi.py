"""OpenAPI 3.1 documents of the dialects, made from what each one declares
(`Dialect.describe`, `dialects.describe`): paths from its endpoints, schemas
from its msgspec types (`msgspec.json.schema_components`).

Served at `/openapi/<dialect>.json` for the enabled dialects (`routes`);
the shipped dialects' documents with the default configuration are
checked in under docs/openapi/, written by

    python -m gateway.openapi --write docs/openapi
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dialects.base import Dialect, Endpoint
from dialects.describe import CREDENTIAL_KEY, Answer, Auth, Operation
from gateway.config import Settings
from gateway.registry import Registry, discover

REF = "#/components/schemas/{name}"
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}


def document(dialect: Dialect, credentials: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any] | None:
    """The dialect's OpenAPI document; None when it does not describe itself.
    `credentials` (credential list -> valid values; tests only) lists the
    valid values of every credential-marked schema as its `enum`."""
    described = dialect.describe()
    if described is None:
        return None
    paths = _paths(dialect.endpoints())
    types = _types(described.operations)
    inline, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(map(_key, types), inline, strict=True))
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": described.title, "version": described.version,
                 "description": described.description + _credentials_text(described.auth)},
        "paths": {},
        "components": {"schemas": dict(sorted(components.items()))},
    }
    schemes = {a.name: scheme for a in described.auth if (scheme := _scheme(a)) is not None}
    if schemes:
        doc["components"]["securitySchemes"] = schemes
    auth = {a.name: a for a in described.auth}
    for operation in described.operations:
        for path in paths.get(operation.endpoint, ()):
            item = _operation(dialect.name, path, operation, schemas, auth)
            doc["paths"].setdefault(path, {})[operation.method.lower()] = item
    return doc if credentials is None else fill(doc, credentials)


def encode(doc: dict[str, Any]) -> bytes:
    """The document as written to docs/openapi/ and served: stable bytes."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def routes(settings: Settings) -> list[Route]:
    """`/openapi/<dialect>.json` for every enabled dialect that describes itself."""
    found: list[Route] = []
    for cls in settings.registry:
        config = settings.dialect_config(cls.name)
        if not config.enabled:
            continue
        doc = document(cls(config, {}))
        if doc is not None:
            found.append(Route(f"/openapi/{cls.name}.json", _serve(encode(doc)), methods=["GET"]))
    return found


def _serve(body: bytes) -> Any:
    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return endpoint


def _paths(endpoints: Iterable[Endpoint]) -> dict[str, list[str]]:
    """Endpoint name -> its paths (one name may be served at several)."""
    paths: dict[str, list[str]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.name, []).append(endpoint.path)
    return paths


def _key(type_: Any) -> str:
    return repr(type_)


def _types(operations: Iterable[Operation]) -> tuple[Any, ...]:
    """Every type the operations name, once each, in order."""
    found: dict[str, Any] = {}
    for operation in operations:
        for param in operation.params:
            found.setdefault(_key(param.type), param.type)
        for body in operation.bodies:
            found.setdefault(_key(body.type), body.type)
        for answer in operation.answers:
            for _, type_ in answer.bodies:
                for one in type_ if isinstance(type_, tuple) else (type_,):
                    found.setdefault(_key(one), one)
    return tuple(found.values())


def _operation(dialect: str, path: str, operation: Operation, schemas: dict[str, Any],
               auth: dict[str, Auth]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "operationId": f"{dialect}_{operation.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": operation.summary,
    }
    if operation.description:
        item["description"] = operation.description
    if operation.params:
        item["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.required, "schema": schemas[_key(p.type)],
             **({"description": p.description} if p.description else {})}
            for p in operation.params
        ]
    if operation.bodies:
        content: dict[str, Any] = {}
        for body in operation.bodies:
            for media_type in body.media_types:
                content[media_type] = {"schema": schemas[_key(body.type)]}
        description = " ".join(b.description for b in operation.bodies if b.description)
        item["requestBody"] = {"required": operation.body_required, "content": content,
                               **({"description": description} if description else {})}
    item["responses"] = {str(a.status): _answer(a, schemas) for a in operation.answers}
    if operation.auth:
        kinds = [auth[name] for name in operation.auth]
        security: list[dict[str, list[str]]] = [{a.name: []} for a in kinds if a.kind != "body"]
        if any(a.kind == "body" for a in kinds):
            # A credential in the body is enough without any scheme.
            security.append({})
        item["security"] = security
    return item


def _answer(answer: Answer, schemas: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    headers: dict[str, Any] = {}
    if answer.retry_after:
        headers["Retry-After"] = {**RETRY_AFTER, "required": True}
    for name, description in answer.headers:
        headers[name] = {"description": description, "schema": {"type": "string"}}
    if headers:
        out["headers"] = headers
    if answer.bodies:
        out["content"] = {media_type: {"schema": _schema(type_, schemas)} for media_type, type_ in answer.bodies}
    return out


def _schema(type_: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """A type's schema; a tuple of types: any of theirs (Structs msgspec
    will not put in one untagged union)."""
    if isinstance(type_, tuple):
        return {"anyOf": [schemas[_key(one)] for one in type_]}
    return dict(schemas[_key(type_)])


def _scheme(auth: Auth) -> dict[str, Any] | None:
    scheme: dict[str, Any]
    if auth.kind in ("bearer", "basic"):
        scheme = {"type": "http", "scheme": auth.kind, "description": auth.description}
    elif auth.kind in ("header", "query"):
        scheme = {"type": "apiKey", "in": auth.kind, "name": auth.param, "description": auth.description}
    else:
        return None  # in the body: said in the text and on the field
    if auth.credential:
        scheme[CREDENTIAL_KEY] = auth.credential
    return scheme


def _credentials_text(auth: Sequence[Auth]) -> str:
    if not auth:
        return ""
    where = {"bearer": "`Authorization: Bearer <key>`", "basic": "HTTP Basic",
             "header": "header `{}`", "query": "query parameter `{}`", "body": "the body's `{}`"}
    lines = [f"- {where[a.kind].format(a.param)}: {a.description}" for a in auth]
    return "\n\nCredentials:\n" + "\n".join(lines)


def fill(doc: dict[str, Any], credentials: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """`doc` with the valid values as the `enum` of every credential-marked
    schema (a test's document: the served one lists no credential)."""
    _fill(doc, credentials)
    return doc


def _fill(node: Any, credentials: Mapping[str, Sequence[Any]]) -> None:
    if isinstance(node, dict):
        field = node.get(CREDENTIAL_KEY)
        if isinstance(field, str) and field in credentials:
            node["enum"] = list(credentials[field])
        for value in node.values():
            _fill(value, credentials)
    elif isinstance(node, list):
        for value in node:
            _fill(value, credentials)


def shipped(registry: Registry) -> dict[str, dict[str, Any]]:
    """name -> document of every registered dialect that describes itself,
    with its default configuration (what docs/openapi/ holds)."""
    docs: dict[str, dict[str, Any]] = {}
    for cls in registry:
        doc = document(cls(msgspec.convert({}, cls.Config), {}))
        if doc is not None:
            docs[cls.name] = doc
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.openapi",
                                     description="write the dialects' OpenAPI documents")
    parser.add_argument("--write", metavar="DIR", required=True, help="directory for <dialect>.json files")
    args = parser.parse_args(argv)
    out = Path(args.write)
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in shipped(discover()).items():
        (out / f"{name}.json").write_bytes(encode(doc))
        print(f"{out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
