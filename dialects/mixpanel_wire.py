"""Mixpanel's encodings (DIALECTS.md, mixpanel; MIXPANEL.md 1.2, 3.5): how
a request's records and parameters are read, whatever the SDK.

- GET `?data=` (node's track, alias, people, groups, import);
- POST form `data=` (python: plain JSON, URL-encoded; browser: base64,
  URL-encoded; node batches: base64 NOT URL-encoded, so a form decoder has
  turned its `+` into spaces, put back here), also under `text/plain` as
  sendBeacon sends it; other form fields (`verbose`, `ip`, `api_key`) are
  parameters like the query's;
- POST JSON (an object or an array; on /import also NDJSON, one record a
  line).

A body is JSON when its first non-blank byte opens an object or an array,
whatever the Content-Type says; otherwise it is a form. `data` holds JSON
when it starts with `{` or `[`, else standard base64 of JSON.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Iterable
from typing import Any
from urllib.parse import unquote_plus

import msgspec

from dialects.base import Incoming
from dialects.limits import NotJson, load_json

_BLANK = b" \t\r\n"
_OPENERS = (ord("{"), ord("["))
# Values of `verbose`, `ip`, `strict` that mean off.
_OFF = frozenset({"", "0", "false", "False"})


class Wire(msgspec.Struct, kw_only=True):
    """What a request carries, decoded: the JSON value of its records,
    whether it is shallow (`dialects.limits.decode_json`), its parameters
    (query, then form fields), and whether it came in the legacy `data=`
    encoding (GET or form) rather than as a JSON body."""

    value: Any
    shallow: bool
    params: dict[str, str]
    legacy: bool


class NoData(Exception):
    """A GET or form request without a `data` parameter."""


def is_json_body(body: bytes) -> bool:
    stripped = body.lstrip(_BLANK)
    return bool(stripped) and stripped[0] in _OPENERS


def query_params(request: Incoming) -> dict[str, str]:
    return dict(request.query)


def form_fields(body: bytes) -> dict[str, str]:
    """The fields of a form body (the `data` field kept raw, undecoded:
    how to decode it depends on what it holds)."""
    fields: dict[str, str] = {}
    for part in body.split(b"&"):
        key, _, value = part.partition(b"=")
        name = unquote_plus(key.decode("latin-1"))
        fields[name] = value.decode("latin-1") if name == "data" else unquote_plus(value.decode("utf-8", "replace"))
    return fields


def data_bytes(raw: str, url_encoded: bool = True) -> bytes:
    """The JSON bytes a `data` value holds: plain JSON, or standard base64
    (a space being a `+` a form decoder took for one). Raises NotJson."""
    text = unquote_plus(raw) if url_encoded else raw
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        return stripped.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(stripped.replace(" ", "+").strip(), validate=True)
    except (binascii.Error, ValueError):
        raise NotJson from None


def decode(request: Incoming, envelope: bool = True) -> Wire:
    """The request's records and parameters. Raises NoData, NotJson,
    TooDeep (dialects.limits)."""
    params = query_params(request)
    body = request.body
    if request.method == "GET" or not body.strip(_BLANK):
        raw = params.get("data")
        if raw is None:
            raise NoData
        # parse_qsl has already undone the query's URL encoding.
        value, shallow = load_json(data_bytes(raw, url_encoded=False), () if envelope else None)
        return Wire(value=value, shallow=shallow, params=params, legacy=True)
    if is_json_body(body):
        try:
            value, shallow = load_json(body)
        except NotJson:
            if request.endpoint != "import":
                raise
            value, shallow = _ndjson(body), False
        return Wire(value=value, shallow=shallow, params=params, legacy=False)
    fields = form_fields(body)
    raw = fields.pop("data", None)
    if raw is None:
        raise NoData
    params.update(fields)
    value, shallow = load_json(data_bytes(raw))
    return Wire(value=value, shallow=shallow, params=params, legacy=True)


def _ndjson(body: bytes) -> list[Any]:
    """Newline-delimited JSON (on /import), one record a line."""
    records = []
    for line in body.splitlines():
        if line.strip(_BLANK):
            value, _ = load_json(line)
            records.append(value)
    if not records:
        raise NotJson
    return records


def flag(params: dict[str, str], name: str, default: bool = False) -> bool:
    value = params.get(name)
    return default if value is None else value not in _OFF


def verbose(request: Incoming) -> bool:
    """Whether the answer is JSON (`verbose` truthy, in the query or a form
    field). Found without decoding the body: a form's `data` (base64 or
    URL-encoded JSON) never holds `&verbose=`."""
    value = query_params(request).get("verbose")
    if value is None and request.method == "POST" and not is_json_body(request.body):
        body = request.body
        at = 0 if body.startswith(b"verbose=") else body.find(b"&verbose=") + 1
        if at > 0 or body.startswith(b"verbose="):
            end = body.find(b"&", at)
            value = body[at + 8: end if end >= 0 else len(body)].decode("latin-1")
    return value is not None and value not in _OFF


class _Props(msgspec.Struct):
    token: Any = None


class _Tokens(msgspec.Struct):
    """Where a record's token is; every other key is skipped unread."""

    properties: _Props | None = None
    token: Any = None
    dollar_token: Any = msgspec.field(default=None, name="$token")


_decode_tokens = msgspec.json.Decoder(list[_Tokens] | _Tokens).decode


def json_tokens(body: bytes) -> Iterable[Hashable] | None:
    """The tokens of a JSON body, read without building its records (on a
    shared path, every Cohorly request is asked for them); None when the
    body does not have the shape this reads (then `decode` decides)."""
    try:
        value: list[_Tokens] | _Tokens = _decode_tokens(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None
    found: set[Hashable] = set()
    for item in value if isinstance(value, list) else [value]:
        props = item.properties
        token = props.token if props is not None and props.token is not None else (
            item.dollar_token if item.dollar_token is not None else item.token)
        if type(token) is str:
            found.add(token)
    return found


def tokens_in(value: Any) -> Iterable[Hashable]:
    """The tokens of decoded records where Mixpanel puts them:
    `properties.token` on events, `$token` on profile and group updates."""
    found: set[Hashable] = set()
    for item in value if type(value) is list else [value]:
        if type(item) is not dict:
            continue
        props = item.get("properties")
        # Events carry it in their properties, updates as `$token`.
        token = props["token"] if type(props) is dict and "token" in props else item.get("$token", item.get("token"))
        if type(token) is str:
            found.add(token)
    return found
