"""What `serve` and `migrate` check before they start: the database answers
(and is migrated) and the configured Redis answers (a taken port is
`gateway.serve.CannotListen`). A failure is a StartupError whose message is one line naming the
cause, with every password masked, for the CLI to print instead of a
traceback."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from gateway.checks import mask_url

# How long the first connection to Redis may take at start (the database's
# connect timeout is the engine's own, storage.engine).
REDIS_TIMEOUT = 5.0
# A cause longer than this is cut: the line must stay one line on a terminal
# or in a journal.
MAX_CAUSE = 300


class StartupError(Exception):
    """A one-line reason the process cannot start (exit status 1)."""


async def prepare_database(url: str, *, migrate: bool) -> None:
    """Connect (SELECT 1), then run the migrations to head when `migrate`."""
    from sqlalchemy import text

    from storage.engine import Backend, backend_of, create_engine
    from storage.migrate import upgrade

    engine = create_engine(url)
    try:
        try:
            if backend_of(url) is Backend.SQLITE:
                _open_sqlite(url)
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise StartupError(f"cannot connect to the database {mask_url(url)}: {cause(exc, url)}") from None
        if migrate:
            try:
                await upgrade(engine)
            except Exception as exc:
                raise StartupError(f"migrating the database {mask_url(url)} failed: {cause(exc, url)}") from None
    finally:
        await engine.dispose()


def _open_sqlite(url: str) -> None:
    """Open the file with the standard driver first: when aiosqlite fails to
    connect, its thread may answer after the event loop has closed and
    print a traceback of its own."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    engine = create_engine(make_url(url).set(drivername="sqlite"))
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


async def check_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT)
    try:
        await client.ping()
    except Exception as exc:
        raise StartupError(f"cannot connect to Redis at {mask_url(url)}: {cause(exc, url)}") from None
    finally:
        await client.aclose()


def run(check: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async check; whatever it raises but a StartupError is turned
    into one (a failure no branch above foresaw still gets its one line)."""
    try:
        asyncio.run(check())
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(f"start-up failed: {cause(exc, '')}") from None


def cause(exc: BaseException, url: str) -> str:
    """The innermost cause of `exc` in one line: the driver's or the
    system's own words (SQLAlchemy's and redis-py's wrappers add the
    address, a link and line breaks), with `url`'s password masked."""
    root = exc
    seen = {id(root)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    if isinstance(root, TimeoutError):
        text = "timed out"
    elif isinstance(root, socket.gaierror):
        text = f"cannot resolve the host name ({root.strerror or root})"
    elif isinstance(root, OSError) and root.errno is not None:
        text = os.strerror(root.errno)
    else:
        text = str(root) or type(root).__name__
    text = " ".join(text.split())
    for secret in _passwords(url):
        text = text.replace(secret, "***")
    return text if len(text) <= MAX_CAUSE else text[: MAX_CAUSE - 3] + "..."


def _passwords(url: str) -> list[str]:
    """The password of `url` (in the user info or as a `password=` query
    parameter) in each spelling a message could quote: as written, decoded
    and encoded."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in ("password", "passwd", "pass") and v]
    except ValueError:
        return []
    spellings = {s for p in found for s in (p, unquote(p), quote(unquote(p), safe=""))}
    # Longest first: a spelling inside another is not left half masked.
    return sorted(spellings, key=len, reverse=True)
