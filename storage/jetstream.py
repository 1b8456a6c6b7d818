"""The log sink: each request's records published to a replicated stream
(NATS JetStream), answered once the stream acknowledged every one of them.

A request's messages are published back to back, each with a reply subject
of this process's own (one subscription for all acknowledgements), and the
request waits for all of their acknowledgements at once: a batch costs one
round trip, not one per record, and requests overlap freely. The stream's
acknowledgement comes once the stream's replicas have the message; its
`duplicate` flag (the same `Nats-Msg-Id` within the duplicate window) is how
an event sent twice is told apart. `dialgate load` (storage.loader) writes
the tables.

The stream is created, or its settings updated, when the sink connects; a
sink that cannot reach the servers keeps trying in the background and
refuses requests with StorageUnavailable (503 with Retry-After) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

from gateway.model import Alias, Event, GroupUpdate, ProfileUpdate, Record, Rejection
from storage.groups import clean
from storage.logrecords import EVENTS, MessageIds, encode, lane, subject
from storage.sink import StorageUnavailable, StreamOptions, Unstorable, Written

log = logging.getLogger("dialgate.stream")

# Seconds between two attempts to reach the servers (at start, or after the
# connection closed for good).
RECONNECT = 1.0


class _Ack(msgspec.Struct):
    """JetStream's answer to a publish: {"stream", "seq", "duplicate"} or {"error"}."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ACK = msgspec.json.Decoder(_Ack)
# Records per message at most (a larger request is split).
MAX_RECORDS = 1000


class _Message:
    __slots__ = ("subject", "payload", "id", "records")

    def __init__(self, subject_: str, payload: bytes, id_: str, records: Sequence[Record | Rejection]) -> None:
        self.subject = subject_
        self.payload = payload
        self.id = id_
        self.records = records
_HEADER = "Nats-Msg-Id"


class _Waiting:
    """One request's acknowledgements: how many are due, and which were duplicates."""

    __slots__ = ("due", "duplicate", "failed", "done")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.due = count
        self.duplicate = [False] * count
        self.failed: str | None = None
        self.done = done


def stream_config(options: StreamOptions) -> StreamConfig:
    return StreamConfig(
        name=options.stream,
        subjects=[f"{options.stream}.>"],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=options.max_age,
        storage=StorageType.FILE,
        num_replicas=options.replicas,
        duplicate_window=options.duplicate_window,
    )


async def ensure_stream(js: JetStreamContext, options: StreamOptions) -> None:
    """Create the stream, or bring an existing one to these settings."""
    config = stream_config(options)
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Already there with other settings (name in use): update them.
        await js.update_stream(config)


async def connect(servers: Sequence[str], name: str) -> Client:
    """A connection that reconnects by itself for as long as it takes, made
    once some server accepts TCP connections (OSError before that; the
    caller tries again). nats-py, told to reconnect for ever, also keeps
    trying a first connection inside `connect` for ever, where a
    cancellation can be lost (Python 3.11's asyncio.wait_for): a gateway
    closing while the stream was down could wait for ever."""
    await _reachable(servers)
    return await nats.connect(
        servers=list(servers), name=name, connect_timeout=2, allow_reconnect=True,
        max_reconnect_attempts=-1, reconnect_time_wait=0.5,
    )


async def _reachable(servers: Sequence[str]) -> None:
    for url in servers:
        parsed = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            async with asyncio.timeout(2):
                _, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 4222)
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        return
    raise OSError(f"no server accepts connections ({', '.join(servers)})")


async def _await_leader(js: Any, stream: str, *, attempts: int = 100) -> None:
    """Until the stream has a leader: a replicated stream just created or
    updated answers "no responders" (a 503 to the gateway's callers) until
    its replicas elect one."""
    for _ in range(attempts):
        info = await js.stream_info(stream)
        if info.cluster is None or info.cluster.leader:
            return
        await asyncio.sleep(0.1)


class StreamSink:
    """storage.sink.Sink for the stream."""

    def __init__(self, options: StreamOptions) -> None:
        self._options = options
        self._ids = MessageIds()
        self._nc: Client | None = None
        self._prefix = ""
        self._tokens = 0
        # reply token -> (the request waiting, the message's index in it)
        self._waiting: dict[str, tuple[_Waiting, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        # Set once the first attempt to connect is over, either way: requests
        # that come during it wait for it rather than find no stream yet.
        self._tried = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    def ready(self) -> bool:
        """Connected to a stream that has a leader (for /readyz)."""
        return not self._closed and self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        while not self._closed:
            nc = None
            try:
                nc = await connect(self._options.servers, "dialgate-gateway")
                js = nc.jetstream(timeout=5)
                await ensure_stream(js, self._options)
                await _await_leader(js, self._options.stream)
                self._prefix = nc.new_inbox() + "."
                await nc.subscribe(self._prefix + "*", cb=self._on_ack, pending_msgs_limit=-1,
                                   pending_bytes_limit=-1)
                self._nc = nc
                self._tried.set()
                log.info("publishing to stream %s", self._options.stream)
                return
            except Exception as exc:
                log.warning("stream %s not reachable (%s); trying again", self._options.stream, exc or type(exc))
                if nc is not None:
                    await _close_quietly(nc)
                self._tried.set()
                await asyncio.sleep(RECONNECT)

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if entry is None:
            return  # answered after its request gave up
        waiting, index = entry
        try:
            ack = _ACK.decode(msg.data) if msg.data else None
        except msgspec.DecodeError:
            ack = None
        if ack is None or ack.error is not None or not ack.seq:
            # No stream took it (no responders: a status message, no body),
            # or the stream refused it (storage full, no quorum).
            waiting.failed = str(ack.error if ack is not None and ack.error else msg.headers or "no answer")
        else:
            waiting.duplicate[index] = ack.duplicate
        waiting.due -= 1
        if (waiting.due == 0 or waiting.failed) and not waiting.done.done():
            waiting.done.set_result(None)

    async def submit(self, records: list[Record], rejections: Sequence[Rejection] = ()) -> Written:
        if self._nc is None and not self._tried.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tried.wait(), self._options.ack_timeout)
        messages = self._messages(records, rejections)
        duplicate = await self._publish(messages) if messages else []
        return _written(records, messages, duplicate)

    def _messages(self, records: list[Record], rejections: Sequence[Rejection]) -> list[_Message]:
        """The request's records as messages: one per project and lane, in
        the request's order, split where one would be too large."""
        chunks: dict[tuple[str | None, str], list[Record | Rejection]] = {}
        for record in records:
            if not _self_alias(record):
                chunks.setdefault((record.project, lane(record)), []).append(record)
        for rejection in rejections:
            chunks.setdefault((rejection.project, EVENTS), []).append(rejection)
        messages: list[_Message] = []
        for (project, lane_), chunk in chunks.items():
            self._split(subject(self._options.stream, project, lane_), chunk, messages)
        return messages

    def _split(self, subject_: str, chunk: Sequence[Record | Rejection], out: list[_Message]) -> None:
        payload = encode(chunk) if len(chunk) <= MAX_RECORDS else b""
        limit = self._nc.max_payload if self._nc is not None else 1_048_576
        if payload and len(payload) <= limit - 256:
            out.append(_Message(subject_, payload, self._ids.of(chunk), chunk))
        elif len(chunk) == 1:
            raise Unstorable(f"a record of {len(payload)} bytes is over the stream's message size")
        else:
            half = len(chunk) // 2
            self._split(subject_, chunk[:half], out)
            self._split(subject_, chunk[half:], out)

    async def _publish(self, messages: Sequence[_Message]) -> list[bool]:
        nc = self._nc
        if self._closed or nc is None or not nc.is_connected:
            raise StorageUnavailable("the stream is not reachable")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(len(messages), done)
        tokens = []
        prefix = self._prefix
        try:
            for index, message in enumerate(messages):
                self._tokens += 1
                token = str(self._tokens)
                tokens.append(token)
                self._waiting[token] = (waiting, index)
                await nc.publish(message.subject, message.payload, reply=prefix + token,
                                 headers={_HEADER: message.id})
            await asyncio.wait_for(asyncio.shield(done), self._options.ack_timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StorageUnavailable(f"the stream did not acknowledge: {exc or type(exc).__name__}") from None
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        if waiting.failed:
            raise StorageUnavailable(f"the stream refused: {waiting.failed}")
        return waiting.duplicate

    def quarantine(self, rejections: list[Rejection]) -> None:
        """Publish rejections without making anyone wait for them (lost if
        the stream cannot take them, as the database sink's are when full)."""
        if not rejections or self._closed or self._nc is None:
            return
        task = asyncio.get_running_loop().create_task(self._quietly(rejections))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, rejections: list[Rejection]) -> None:
        try:
            await self._publish(self._messages([], rejections))
        except StorageUnavailable as exc:
            log.warning("rejections not kept: %s", exc)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: on Python 3.11 a cancellation that meets a finishing
            # asyncio.wait_for (nats-py's connect) can be lost; the loop
            # then ends by itself at its next turn (`_closed`).
            await asyncio.wait({self._task}, timeout=RECONNECT + 3)
            if not self._task.done():
                log.warning("the stream connection attempt did not stop; left behind")
        if self._background:
            await asyncio.wait(self._background, timeout=self._options.ack_timeout)
        if self._nc is not None:
            await _close_quietly(self._nc)
            self._nc = None

    async def stream_backlog(self) -> dict[str, int]:
        """Messages not yet acknowledged by the loaders, per consumer
        (pending delivery plus delivered but unacknowledged)."""
        if self._nc is None:
            return {}
        return await consumers_backlog(self._nc.jetstream(timeout=2), self._options.stream)


async def consumers_backlog(js: JetStreamContext, stream: str) -> dict[str, int]:
    infos = await js.consumers_info(stream)
    return {str(info.name): (info.num_pending or 0) + (info.num_ack_pending or 0) for info in infos}


def _self_alias(record: Record) -> bool:
    # Linking an id to itself stores nothing (storage.transaction): answered here.
    return type(record) is Alias and clean(record.alias) == clean(record.distinct_id)


def _written(records: list[Record], published: Sequence[_Message], duplicate: list[bool]) -> Written:
    """The request's outcome as the stream knows it: an event is new unless
    the stream had its id; profile and group updates count as applied and
    aliases as linked (what they do to the tables is the loader's, later;
    a conflict is quarantined then)."""
    written = Written()
    # A message of events is a duplicate as a whole (its id is their keys').
    flags = {id(r): d for m, d in zip(published, duplicate, strict=False) if d for r in m.records}
    for record in records:
        kind = type(record)
        if kind is Event:
            event: Event = record  # type: ignore[assignment]
            if event.insert_id is None:
                written.inserted += 1
            elif flags.get(id(record), False):
                written.duplicates += 1
            else:
                written.inserted += 1
                written.new_keys.append((event.project, event.source, clean(event.insert_id)))
        elif kind is ProfileUpdate or kind is GroupUpdate:
            written.applied += 1
        elif kind is Alias:
            written.aliases.append("self" if _self_alias(record) else "linked")
    return written


async def _close_quietly(nc: Client) -> None:
    try:
        await nc.close()
    except Exception as exc:
        log.debug("closing the stream connection: %s", exc)
