"""storage.loader (`dialgate load`): a loader killed between its commit and
its acknowledgement stores nothing twice when the stream delivers again, and
a loader whose database is down acknowledges nothing and resumes by itself.
Real nats-server, real databases, the real command in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from gateway.config import Settings
from storage.jetstream import consumers_backlog
from tests.faults.proxy import TcpProxy
from tests.natsserver import NatsServer
from tests.storage.streams import SHOP, loading, stream_settings, tracked, until
from tests.support import ADMIN_KEY, events_of, gateway, props_of

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]

# `dialgate load`, killed (SIGKILL) by itself right after its first commit,
# before it acknowledges anything.
DIE_BEFORE_ACK = """
import os, signal, sys
import storage.loader

async def die(msgs):
    os.kill(os.getpid(), signal.SIGKILL)

storage.loader._ack = die
from gateway.cli import main
sys.exit(main(["load", "--config", sys.argv[1]]))
"""


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path) as server:
        yield server


def _toml(settings: Settings, path: Path) -> Path:
    sink, loader = settings.sink, settings.loader
    path.write_text(
        f'[storage]\nurl = {json.dumps(settings.storage.url)}\n'
        f'[admin]\nkeys = ["{ADMIN_KEY}"]\n'
        f'[sink]\nkind = "jetstream"\nservers = {json.dumps(sink.servers)}\nstream = "{sink.stream}"\n'
        f'[loader]\nlease_seconds = {loader.lease_seconds}\nack_wait_seconds = {loader.ack_wait_seconds}\n'
        '[[projects]]\nname = "shop"\ncohorly_tokens = ["tok_shop"]\n',
        encoding="utf-8",
    )
    return path


async def _backlog(settings: Settings) -> int:
    nc = await nats.connect(settings.sink.servers)
    try:
        return sum((await consumers_backlog(nc.jetstream(), settings.sink.stream)).values())
    finally:
        await nc.close()


async def test_killed_after_commit_before_ack_stores_nothing_twice(backend, nats_server, tmp_path) -> None:
    settings = stream_settings(backend, [nats_server.url])
    async with gateway(settings) as client:
        # Keyed and keyless events, and profile operations that must not
        # apply twice.
        body = tracked(("a", "id-a"), ("b", None), ("c", None))
        assert (await client.post("/track", headers=SHOP, json=body)).status_code == 200
        for _ in range(3):
            reply = await client.post("/engage", headers=SHOP, json={"distinct_id": "u", "$add": {"n": 1}})
            assert reply.status_code == 200
        config = _toml(settings, tmp_path / "load.toml")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        dead = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", DIE_BEFORE_ACK, str(config)],
                                       env=env, timeout=60, capture_output=True)
        assert dead.returncode == -signal.SIGKILL, dead.stderr.decode()[-2000:]
        # It committed something (events or profiles, whichever came first)
        # and acknowledged nothing.
        stored = len(await events_of(client)) + ((await props_of(client, "u")) or {}).get("n", 0)
        assert stored > 0
        assert await _backlog(settings) > 0
        # The stream delivers again (after ack_wait; the identity partition
        # after the dead holder's lease): everything once.
        async with loading(settings):
            await until(lambda: _settled(settings, client))
        assert sorted(e["name"] for e in await events_of(client)) == ["a", "b", "c"]
        assert await props_of(client, "u") == {"n": 3}


async def _settled(settings: Settings, client) -> bool:
    return await _backlog(settings) == 0 and len(await events_of(client)) >= 3 and \
        await props_of(client, "u") == {"n": 3}


@pytest.mark.postgres
async def test_database_down_no_ack_then_resumes(postgres_backend, nats_server) -> None:
    settings = stream_settings(postgres_backend, [nats_server.url])
    url = settings.storage.url
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    with TcpProxy("127.0.0.1", int(host_port.rsplit(":", 1)[1])) as proxy:
        via_proxy = url.replace(host_port, f"127.0.0.1:{proxy.port}")
        loader_settings = stream_settings(postgres_backend, [nats_server.url], storage={"url": via_proxy},
                                          sink={"stream": settings.sink.stream})
        proxy.cut()
        async with gateway(settings) as client, loading(loader_settings):
            body = tracked(*((f"e{i}", f"id-{i}") for i in range(50)))
            assert (await client.post("/track", headers=SHOP, json=body)).status_code == 200
            await asyncio.sleep(3)
            assert await events_of(client) == []
            assert await _backlog(settings) == 1
            proxy.restore()
            await until(lambda: _loaded(settings, client, 50))


async def _loaded(settings: Settings, client, count: int) -> bool:
    return len(await events_of(client)) == count and await _backlog(settings) == 0
