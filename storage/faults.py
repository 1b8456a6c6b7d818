"""What a database error means: the connection, the server, or the data.

SDKs throw a batch away on a 4xx and send it again after a 503, so the one
question that matters is whether the same request could be stored later.
Only a genuine data error (a value the column or the constraint refuses) is
`DATA`; a closed or broken connection, a server shutting down or starting
up, a failover, a refused or timed-out connection is `LOST` (renew the
connections and try once more); a server that is there but cannot do the
work now (a lock or statement timeout, too many connections, a transaction
chosen to break a deadlock, SQLite's write lock held past its wait) is
`BUSY`. Anything else is `OTHER`: not the caller's fault, so never a 4xx.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine


class Fault(enum.Enum):
    LOST = "lost"
    BUSY = "busy"
    DATA = "data"
    OTHER = "other"

    @property
    def unavailable(self) -> bool:
        """Answered 503 with Retry-After: the same request may succeed later."""
        return self is Fault.LOST or self is Fault.BUSY


# PostgreSQL SQLSTATEs (prefixes), first match wins.
_PG_STATES: tuple[tuple[str, Fault], ...] = (
    ("08", Fault.LOST),  # connection exception
    ("57P", Fault.LOST),  # admin/crash shutdown, cannot connect now, database dropped, idle timeout
    ("25006", Fault.LOST),  # read-only transaction: this server is a standby now (failover)
    ("25P03", Fault.LOST),  # idle-in-transaction timeout ended the session
    ("58", Fault.LOST),  # system error: I/O error on the server
    ("40", Fault.BUSY),  # deadlock or serialization failure: rolled back, nothing kept
    ("53", Fault.BUSY),  # insufficient resources: too many connections, disk full, out of memory
    ("55P03", Fault.BUSY),  # lock not available (lock_timeout)
    ("57014", Fault.BUSY),  # query cancelled: statement_timeout or an operator
    ("22", Fault.DATA),  # data exception: out of range, invalid text, untranslatable character
    ("23", Fault.DATA),  # integrity constraint violation
    ("54", Fault.DATA),  # program limit exceeded: a value too large for the server
)

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_CODES: dict[int, Fault] = {
    3: Fault.LOST,  # PERM
    7: Fault.BUSY,  # NOMEM
    8: Fault.LOST,  # READONLY: the file or its directory is not writable
    10: Fault.LOST,  # IOERR
    11: Fault.LOST,  # CORRUPT
    13: Fault.BUSY,  # FULL: the disk is full
    14: Fault.LOST,  # CANTOPEN
    15: Fault.LOST,  # PROTOCOL
    26: Fault.LOST,  # NOTADB
    5: Fault.BUSY,  # BUSY: another process held the write lock past our wait
    6: Fault.BUSY,  # LOCKED
    18: Fault.DATA,  # TOOBIG: a string or blob over SQLite's limit
    19: Fault.DATA,  # CONSTRAINT
    20: Fault.DATA,  # MISMATCH
    25: Fault.DATA,  # RANGE
}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps (SQLAlchemy's `orig`, `__cause__`)."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 6:
        yield seen
        seen = getattr(seen, "orig", None) or seen.__cause__
        depth += 1


# SQLSTATE of a unique violation.
UNIQUE_VIOLATION = "23505"


def sqlstate(exc: BaseException) -> str:
    for seen in _causes(exc):
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            return state
    return ""


def constraint(exc: BaseException) -> str:
    """The constraint a PostgreSQL error names (a unique violation's key), or ""."""
    for seen in _causes(exc):
        name = getattr(seen, "constraint_name", None)
        if isinstance(name, str):
            return name
    return ""


def classify(exc: BaseException) -> Fault:
    state = sqlstate(exc)
    if state:
        for prefix, fault in _PG_STATES:
            if state.startswith(prefix):
                return fault
    for seen in _causes(exc):
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            if isinstance(code, int) and (code & 0xFF) in _SQLITE_CODES:
                return _SQLITE_CODES[code & 0xFF]
            if isinstance(seen, (sqlite3.IntegrityError, sqlite3.DataError)):
                return Fault.DATA
            if isinstance(seen, sqlite3.OperationalError):
                return Fault.BUSY
            continue
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return Fault.LOST
        if isinstance(seen, sa_exc.TimeoutError):
            return Fault.BUSY  # no pooled connection came free in time
        if isinstance(seen, sa_exc.InvalidRequestError) and "connection is closed" in str(seen):
            # The pool handed out a connection another lane's fault had just
            # invalidated (checkout races a renewal): nothing was sent yet.
            return Fault.LOST
        if isinstance(seen, (OSError, ConnectionError, asyncio.TimeoutError, EOFError)):
            return Fault.LOST  # refused, reset, unreachable, or no answer in time
        name = type(seen).__name__
        module = type(seen).__module__
        if module.startswith("asyncpg"):
            if name in ("InterfaceError", "InternalClientError") or "Connection" in name:
                # "connection is closed", "another operation is in progress"
                # (the server's goodbye arrived on an idle connection): the
                # connection, not the data (asyncpg's client-side data
                # errors are also ValueErrors).
                return Fault.DATA if isinstance(seen, ValueError) else Fault.LOST
            if isinstance(seen, ValueError):
                return Fault.DATA
        if isinstance(seen, (OverflowError, UnicodeError)):
            # A value the driver cannot bind (an integer over 64 bits, a
            # lone surrogate): the request's data.
            return Fault.DATA
    return Fault.OTHER


def is_unavailable(exc: BaseException) -> bool:
    """True when the database could not be reached or cannot work right now."""
    return classify(exc).unavailable


# Engines whose next checkout must start afresh, and the guard of each.
_guards: weakref.WeakKeyDictionary[Any, _PoolGuard] = weakref.WeakKeyDictionary()


class _PoolGuard:
    """A checkout hook: a pooled connection found closed (the server ended
    it while idle) is replaced by a new one, and after a fault on a path
    that bypasses SQLAlchemy (the writer's raw asyncpg statements) every
    connection made before it is, as SQLAlchemy itself does after a
    disconnect it sees. No round trip: only the socket's state is read."""

    def __init__(self) -> None:
        self.renew = False

    def checkout(self, _dbapi: Any, record: Any, _proxy: Any) -> None:
        if self.renew:
            self.renew = False
            raise sa_exc.InvalidatePoolError("connections renewed after a fault")
        driver = record.driver_connection
        closed = getattr(driver, "is_closed", None)
        if closed is not None and closed():
            raise sa_exc.InvalidatePoolError("the server closed this connection")


def guard_pool(engine: AsyncEngine) -> None:
    guard = _PoolGuard()
    event.listen(engine.sync_engine, "checkout", guard.checkout)
    _guards[engine.sync_engine] = guard


def renew_connections(engine: AsyncEngine) -> None:
    """Every connection checked out from now on is a new one."""
    guard = _guards.get(engine.sync_engine)
    if guard is not None:
        guard.renew = True


def short(exc: BaseException) -> str:
    """The first line of what the driver said, for a log line or a message."""
    text_ = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text_[0] if text_ else type(exc).__name__)[:300]
