"""gateway.loadmetrics: the loader's series, and the stream backlog text a
gateway with the stream sink adds to its /metrics (real nats-server)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.loadmetrics import LoaderMetrics, stream_backlog_text
from storage.jetstream import StreamSink
from storage.loader import events_consumer
from storage.sink import StreamOptions
from tests.natsserver import NatsServer
from tests.storage.records import event

pytestmark = pytest.mark.anyio


def test_loader_series() -> None:
    metrics = LoaderMetrics()
    metrics.loaded("events", 500)
    metrics.loaded("events", 20)
    metrics.backlog({"s_events": 3})
    text = metrics.text().decode()
    assert 'dialgate_loader_records_total{kind="events"} 520.0' in text
    assert 'dialgate_loader_batches_total{kind="events"} 2.0' in text
    assert 'dialgate_stream_pending_messages{consumer="s_events"} 3.0' in text


async def test_stream_backlog_text_counts_what_no_loader_took(tmp_path) -> None:
    with NatsServer(tmp_path) as server:
        sink = StreamSink(StreamOptions(servers=(server.url,), stream="m"))
        sink.start()
        try:
            await sink.submit([event(1)])
            await sink.submit([event(2)])
            # A consumer as the loader makes it, nothing taken yet.
            from nats.js.api import ConsumerConfig

            assert sink._nc is not None
            await sink._nc.jetstream().add_consumer(
                "m", ConsumerConfig(durable_name=events_consumer("m"), filter_subject="m.*.ev"))
            await asyncio.sleep(0.1)
            text = await stream_backlog_text(sink)
            assert 'dialgate_stream_pending_messages{consumer="m_events"} 2' in text
        finally:
            await sink.close()
    assert await stream_backlog_text(object()) == ""


async def test_a_gateway_with_the_stream_sink_shows_the_backlog_on_metrics(backend, tmp_path) -> None:
    from tests.storage.streams import SHOP, loading, stream_settings, tracked, until
    from tests.support import ADMIN, gateway

    with NatsServer(tmp_path) as server:
        settings = stream_settings(backend, [server.url])
        async with gateway(settings) as client:
            async def pending() -> str:
                reply = await client.get("/metrics", headers=ADMIN)
                assert reply.status_code == 200
                return reply.text

            consumer = events_consumer(settings.sink.stream)
            async with loading(settings):  # makes the consumers, drains what there is
                await until(lambda: _shows(pending, f'dialgate_stream_pending_messages{{consumer="{consumer}"}} 0'))
            for n in range(3):  # no loader now: they wait
                body = tracked((f"e{n}", f"id-{n}"))
                assert (await client.post("/track", headers=SHOP, json=body)).status_code == 200
            await until(lambda: _shows(pending, f'dialgate_stream_pending_messages{{consumer="{consumer}"}} 3'))
            text = await pending()
            assert "dialgate_events_received_total" in text  # the gateway's own series are still there


async def _shows(text, line: str) -> bool:
    return line in (await text()).splitlines()
