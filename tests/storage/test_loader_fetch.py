"""The loader's fetches stay small enough for its connection: a backlog of
large messages is drained without the server dropping the loader as a slow
consumer (whose messages in flight would come back only after ack_wait)."""

from __future__ import annotations

import nats
import pytest
from sqlalchemy import text

from gateway.app import stream_options
from gateway.model import Event
from storage.engine import create_engine
from storage.jetstream import ensure_stream
from storage.loader import FETCH_BYTES, FetchSize, events_consumer
from storage.logrecords import EVENTS, encode, subject
from storage.migrate import upgrade
from tests.natsserver import NatsServer
from tests.storage.streams import loading, stream_settings, until

pytestmark = pytest.mark.anyio

MESSAGES = 350
PER_MESSAGE = 400


def test_fetch_size_starts_at_one_message_and_keeps_to_the_byte_bound() -> None:
    size = FetchSize(20_000)
    assert size() == 1  # nothing known yet
    seen = []
    for _ in range(8):
        size.saw(300 * size(), [200_000] * size())
        seen.append(size())
    # 300-record messages of 200 kB: up to the byte bound (41 messages, below
    # the 66 that make a batch of records), never past it.
    assert seen[-1] == FETCH_BYTES // 200_000 == 41
    assert max(seen) <= 41 and seen == sorted(seen)
    # Small messages: up to a batch of records.
    for _ in range(12):
        size.saw(size(), [300] * size())
    assert size() == 1000  # at most 1,000 messages, and 20,000 records / 1
    # Large ones again: the next fetch is bounded by them at once.
    size.saw(1, [1_000_000])
    assert size() <= FETCH_BYTES // 1_000_000


def _events(n: int) -> list[Event]:
    pad = "x" * 400
    return [Event(project="shop", source="cohorly", name="big", distinct_id=f"u{n}-{i}", time=1_700_000_000_000,
                  received_at=1_700_000_000_000, insert_id=f"m{n}-{i}", properties={"pad": pad, "i": i})
            for i in range(PER_MESSAGE)]


async def test_a_backlog_of_large_messages_drains_without_redelivery(backend, tmp_path) -> None:
    with NatsServer(tmp_path) as server:
        settings = stream_settings(backend, [server.url], loader={"ack_wait_seconds": 60.0})
        options = stream_options(settings)
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, options)
            payload_bytes = 0
            for n in range(MESSAGES):
                data = encode(_events(n))
                payload_bytes += len(data)
                await js.publish(subject(options.stream, "shop", EVENTS), data)
            assert payload_bytes > 80_000_000  # past the server's 64 MB of pending bytes per client
            engine = create_engine(settings.storage.url)
            try:
                await upgrade(engine)
                async def loaded() -> bool:
                    async with engine.connect() as conn:
                        count = (await conn.execute(text("SELECT count(*) FROM events"))).scalar()
                    return count == MESSAGES * PER_MESSAGE

                async with loading(settings) as loaders:
                    # Well within ack_wait: nothing waited for a redelivery.
                    await until(loaded, within=40)
                    connection = loaders[0]._nc
                    assert connection is not None and connection.stats["reconnects"] == 0
                info = await js.consumer_info(options.stream, events_consumer(options.stream))
                assert info.num_redelivered == 0 and info.num_ack_pending == 0
            finally:
                await engine.dispose()
        finally:
            await nc.close()
