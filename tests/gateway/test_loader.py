"""gateway.loader: `dialgate load --config FILE` as a process: it drains the
stream, serves its /metrics (records loaded, stream backlog), and stops
cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.loader import load_options
from tests.natsserver import NatsServer
from tests.storage.streams import SHOP, stream_settings, tracked, until
from tests.storage.test_loader import _toml
from tests.support import events_of, free_port, gateway

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def test_load_options_come_from_the_loader_section(sqlite_backend) -> None:
    settings = stream_settings(sqlite_backend, ["nats://127.0.0.1:1"],
                               loader={"batch_max_records": 7, "lease_seconds": 4.0})
    options = load_options(settings)
    assert (options.batch_max_records, options.lease_seconds) == (7, 4.0)


async def test_load_command_drains_serves_metrics_and_stops(sqlite_backend, tmp_path) -> None:
    with NatsServer(tmp_path) as server:
        settings = stream_settings(sqlite_backend, [server.url])
        port = free_port()
        config = _toml(settings, tmp_path / "load.toml")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "gateway.cli", "load", "--config", str(config),
             "--metrics-bind", f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE)
        try:
            async with gateway(settings) as client, httpx.AsyncClient() as http:
                reply = await client.post("/track", headers=SHOP, json=tracked(("a", "id-a"), ("b", "id-b")))
                assert reply.status_code == 200

                async def loaded() -> bool:
                    if len(await events_of(client)) < 2:
                        return False
                    try:
                        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                    except httpx.HTTPError:
                        return False
                    return ('dialgate_loader_records_total{kind="events"} 2.0' in text
                            and f'dialgate_stream_pending_messages{{consumer="{settings.sink.stream}_events"}} 0.0'
                            in text)

                await until(loaded)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 0, err.decode()[-2000:]


def test_load_with_a_bad_config_exits_2(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[sink]\nkind = "jetstream"\nstream = "no.dots"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "load", "--config", str(bad)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"sink.stream" in done.stderr
