"""What a dialect says about its wire, for its OpenAPI document
(`gateway.openapi` turns a `Description` into OpenAPI 3.1).

A dialect returns one from `Dialect.describe()`: for each of its endpoints
(by `Endpoint.name`) and method, the parameters, the bodies it takes by
media type, the credentials it accepts and every answer it can give, with
the status, media type and schema of each. Schemas are msgspec types (the
Structs a dialect decodes with, or declares beside its hand-written checks),
rendered with `msgspec.json.schema_components`, so the document and the code
share one definition.

Credentials: `Auth` names where a request carries one (`header`, `query`,
`bearer`, `basic`: OpenAPI security schemes; `body`: a field of the payload,
which OpenAPI cannot name as a scheme, so it is said in the text and marked
on the field). A value that is a credential is marked with
`Meta(extra_json_schema={CREDENTIAL_KEY: "<list>"})`:
the document then says which `[[projects]]` list holds the valid values,
and a generator given those values (a test, never the served document)
lists them as the field's `enum`.

Wire encodings a type cannot express (a form field holding JSON or its
base64, gzip) are said in `Body.description` and with the JSON Schema
keywords for an encoded string (`contentMediaType`, `contentSchema`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

AuthKind = Literal["header", "query", "bearer", "basic", "body"]
# The key a credential-valued schema carries: the `[[projects]]` list of its valid values.
CREDENTIAL_KEY = "x-dialgate-credential"


class Auth(msgspec.Struct, frozen=True, kw_only=True):
    """One place a credential travels. `name` is the security scheme's
    name in the document; `param` the header or query parameter (for
    `header` and `query`) or where in the body (for `body`, as text)."""

    name: str
    kind: AuthKind
    description: str
    param: str = ""
    # The `[[projects]]` list of its valid values (for `bearer`, `header`,
    # `query`: the user name for `basic`).
    credential: str = ""


class Param(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    where: Literal["query", "header"] = "query"
    type: Any = str
    required: bool = False
    description: str = ""


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """A request body of `media_types` with the schema of `type`."""

    media_types: tuple[str, ...]
    type: Any
    description: str = ""


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """A status with its body, one type per media type (none: no body; a
    tuple of types: any of them)."""

    status: int
    description: str
    bodies: tuple[tuple[str, Any], ...] = ()
    # Answers that carry `Retry-After` (429, 503).
    retry_after: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # other headers: name, description


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str  # Endpoint.name
    method: str
    summary: str
    answers: tuple[Answer, ...]
    description: str = ""
    params: tuple[Param, ...] = ()
    bodies: tuple[Body, ...] = ()
    # False where the payload may come in the query instead (`?data=`).
    body_required: bool = True
    # Names of `Auth`, any one of which is enough; empty: no credential.
    auth: tuple[str, ...] = ()


class Description(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    description: str
    # The document's own version (OpenAPI's `info.version`): bumped when the
    # contract it describes changes, not with every release of Dialgate.
    version: str = "1"
    auth: tuple[Auth, ...] = ()
    operations: tuple[Operation, ...] = ()


def json_answer(status: int, description: str, type_: Any, retry_after: bool = False) -> Answer:
    return Answer(status=status, description=description, bodies=(("application/json", type_),),
                  retry_after=retry_after)
