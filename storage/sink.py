"""The sink: the one interface between the pipeline and storage.

The pipeline hands a request's canonical records to a sink and waits:
"write these durably, tell me which were new". What a sink promises:
- `submit` returns only once the records are committed (durable on the
  backend's terms), with the request's own outcome (`Written`): which keyed
  events were new (`new_keys`, for the dedup cache), how many were
  duplicates, how many profile operations applied, each alias's outcome.
  Events without an insert id are always new.
- A request is atomic: either all of its records are stored, or none and
  `submit` raises. `StorageUnavailable` (the backend cannot take it now,
  `Backlogged` among them): answered 503 with Retry-After, the client sends
  it again. `Unstorable` (the backend refused this request's data): a 4xx of
  the dialect's, nothing stored. One request failing never fails another.
- Identity, profile and device records apply in the order requests were
  submitted to the sink (per process), correct under concurrency across
  processes.
- Rejections passed with the records are stored in the same transaction;
  `quarantine` stores rejections alone, best effort, without waiting.
- `start` before the first submit (in the app's lifespan), `close` writes
  what is queued and stops; after it `submit` raises `StorageUnavailable`.

Which sink runs is chosen once, by `storage.factory.open_sink` from the
`[sink]` and `[storage]` settings; nothing else names an implementation.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gateway.model import AliasOutcome, Record, Rejection

__all__ = [
    "Backlogged", "Queueing", "Sink", "SinkKind", "SinkOptions", "StorageUnavailable", "StreamOptions",
    "Unstorable", "Written",
]


class StorageUnavailable(Exception):
    """The database could not be reached; nothing of the request was stored."""


class Backlogged(StorageUnavailable):
    """The worker's writer backlog is full: answered as the database being
    unavailable (503 with Retry-After), so that SDKs send the batch again."""


class Unstorable(Exception):
    """The database refused this request's data; nothing of it was stored."""


class Written:
    """What one request's records did, as counted inside the transaction."""

    __slots__ = ("inserted", "duplicates", "applied", "aliases", "new_keys", "refused")

    def __init__(self) -> None:
        self.inserted = 0
        self.duplicates = 0
        self.applied = 0
        self.aliases: list[AliasOutcome] = []
        # (project, source, insert_id) of the events this request stored.
        self.new_keys: list[tuple[str, str, str]] = []
        # The reason of each record of this request the transaction refused
        # (quarantined, or, for a strict alias, answered to the client):
        # decided here, counted by the pipeline. Shared while empty.
        self.refused: Sequence[str] = ()


class Sink(Protocol):
    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, records: list[Record], rejections: Sequence[Rejection] = ()) -> Written: ...

    def quarantine(self, rejections: list[Rejection]) -> None: ...


@runtime_checkable
class Queueing(Protocol):
    """A sink that can say how much it holds: the rows (records and
    rejections) queued or being written in this process (for the metrics)."""

    @property
    def backlog(self) -> int: ...


class SinkKind(enum.Enum):
    """The closed set of sinks (`[sink] kind`). DATABASE writes the tables of
    `[storage] url`, SQLite or PostgreSQL as the URL says."""

    DATABASE = "database"
    # The replicated log (storage.jetstream): acknowledged once the stream
    # has the records; `dialgate load` writes the tables behind it.
    JETSTREAM = "jetstream"


@dataclass(frozen=True)
class StreamOptions:
    """Where the log sink publishes (`[sink]`), and how long it waits."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "dialgate"
    replicas: int = 1
    duplicate_window: float = 120.0
    ack_timeout: float = 5.0
    max_age: float = 7 * 86400.0


@dataclass(frozen=True)
class SinkOptions:
    """The tuning every sink takes (from `[storage]` and `[quarantine]`)."""

    # Group commit: at most this many rows per transaction; a positive delay
    # waits that long for a group to fill.
    max_rows: int = 5000
    delay_ms: float = 0.0
    # Transactions written at once per process (PostgreSQL; SQLite: 1).
    lanes: int = 1
    # Rows queued or in flight, all lanes: past it, submit raises Backlogged.
    max_backlog_rows: int = 100_000
    max_profile_bytes: int = 1_048_576
    # Quarantine rows older than this many days are deleted (0: kept).
    keep_days: int = 0
    # The log sink's stream (SinkKind.JETSTREAM).
    stream: StreamOptions = StreamOptions()
