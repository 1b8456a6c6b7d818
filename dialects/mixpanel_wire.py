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

import binascii
from collections.abc import Hashable, Iterable
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

import msgspec

from dialects.base import Incoming
from dialects.limits import NotJson, TooDeep, load_json

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


def form_fields(body: bytes) -> dict[str, str | bytes]:
    """The fields of a form body, the `data` field kept raw, as bytes (how
    to decode it depends on what it holds)."""
    fields: dict[str, str | bytes] = {}
    for part in body.split(b"&"):
        key, _, value = part.partition(b"=")
        name = unquote_plus(key.decode("latin-1"))
        fields[name] = value if name == "data" else unquote_plus(value.decode("utf-8", "replace"))
    return fields


def data_bytes(raw: str | bytes, url_encoded: bool = True) -> bytes:
    """The JSON bytes a `data` value holds: plain JSON, or standard base64.
    Raw from a form (`url_encoded`): JSON is form-encoded (a `+` is a
    space), base64 is URL-encoded by the browser, sent as it is by node (a
    `+` is a `+`); from the query (decoded already) a space in base64 is a
    `+`. Raises NotJson."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    data = data.strip(_BLANK)
    if data[:1] in (b"{", b"[", b"%"):
        # JSON (base64 never starts so: `{` and `[` encode as `e` and `W`).
        if url_encoded:
            data = unquote_to_bytes(data.replace(b"+", b" ")).strip(_BLANK)
        if data[:1] in (b"{", b"["):
            return data
    elif url_encoded and data.find(b"%") >= 0:
        data = unquote_to_bytes(data)
    if b" " in data:
        data = data.replace(b" ", b"+")
    try:
        # Strict: only the alphabet, padding at the end (in C, unlike
        # b64decode's validate, a regular expression).
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise NotJson from None


def decode(request: Incoming, envelope: bool = True, data: bytes | None = None) -> Wire:
    """The request's records and parameters (`data`: the form's `data`
    already decoded, by `carried_tokens`). Raises NoData, NotJson, TooDeep
    (dialects.limits)."""
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
    field = fields.pop("data", None)
    if field is None:
        raise NoData
    params.update({k: v for k, v in fields.items() if isinstance(v, str)})
    value, shallow = load_json(data if data is not None else data_bytes(field))
    return Wire(value=value, shallow=shallow, params=params, legacy=True)


def carried_tokens(request: Incoming) -> tuple[Iterable[Hashable], bytes | None]:
    """The tokens a request carries, read without building its records (on
    a shared path, every request is asked), and a form's `data` decoded
    (for `decode`); nothing when it is not one of Mixpanel's encodings."""
    body = request.body
    form_data = None
    try:
        if request.method == "POST" and is_json_body(body):
            data = body
        elif request.method == "POST" and body.strip(_BLANK):
            raw = form_fields(body).get("data")
            if raw is None:
                return (), None
            data = form_data = data_bytes(raw)
        else:
            query = dict(request.query).get("data")
            if query is None:
                return (), None
            data = data_bytes(query, url_encoded=False)
    except NotJson:
        return (), None
    found = json_tokens(data)
    if found is not None:
        return found, form_data
    try:
        value, _ = load_json(data, None)
    except (NotJson, TooDeep):
        return (), form_data
    return tokens_in(value), form_data


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
    field)."""
    value = param(request, "verbose")
    return value is not None and value not in _OFF


def strict(request: Incoming) -> bool:
    """`strict` truthy, in the query or a form field (as `decode` reads it)."""
    value = param(request, "strict")
    return value is not None and value not in _OFF


def param(request: Incoming, name: str) -> str | None:
    """A parameter from the query, else a form field, found without
    decoding the body: a form's `data` (base64 or URL-encoded JSON) never
    holds `&<name>=`."""
    value = query_params(request).get(name)
    if value is None and request.method == "POST" and not is_json_body(request.body):
        body, key = request.body, name.encode() + b"="
        at = 0 if body.startswith(key) else body.find(b"&" + key) + 1
        if at > 0 or body.startswith(key):
            end = body.find(b"&", at)
            value = body[at + len(key): end if end >= 0 else len(body)].decode("latin-1")
    return value


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
