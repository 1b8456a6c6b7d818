"""The one place a sink is chosen (`[sink] kind`, `[storage] url`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_never

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.model import Rejection
from storage.commit import GroupCommit, Store
from storage.engine import Backend, backend_of
from storage.expiry import QuarantineExpiry
from storage.postgres import PostgresStore
from storage.sink import Sink, SinkKind, SinkOptions
from storage.sqlite import SqliteStore


def _admit_all(_rejection: Rejection) -> bool:
    return True


def open_sink(
    kind: SinkKind,
    engine: AsyncEngine,
    options: SinkOptions,
    *,
    clock: Callable[[], int],
    admit: Callable[[Rejection], bool] = _admit_all,
    on_commit: Callable[[float], None] | None = None,
) -> Sink:
    """A sink, not yet started. `clock` stamps what the sink writes (ms);
    `admit` samples the rejections found while writing into the quarantine;
    `on_commit` is told the seconds each committed transaction took."""
    if kind is SinkKind.DATABASE:
        backend = backend_of(str(engine.url))
        store: Store
        if backend is Backend.SQLITE:
            store = SqliteStore(engine, options, clock=clock, admit=admit)
        elif backend is Backend.POSTGRESQL:
            store = PostgresStore(engine, options, clock=clock, admit=admit)
        else:
            assert_never(backend)
        expiry = QuarantineExpiry(engine, options.keep_days, clock) if options.keep_days > 0 else None
        return GroupCommit(store, options, expiry=expiry, on_commit=on_commit)
    if kind is SinkKind.JETSTREAM:
        from storage.jetstream import StreamSink

        return StreamSink(options.stream)
    assert_never(kind)
