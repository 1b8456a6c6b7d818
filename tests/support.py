"""Helpers shared by the tests: settings, a running gateway, a live server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.app import build_app
from gateway.config import Settings, from_dict
from gateway.pipeline import now_ms
from storage.factory import open_sink
from storage.sink import Sink, SinkKind, SinkOptions

ADMIN_KEY = "adm_test_key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

PROJECTS = [
    {
        "name": "shop",
        "cohorly_tokens": ["tok_shop", "tok_shop_2"],
        "client_keys": ["pk_shop", "sk_shop"],
        "inslytic_keys": ["ins_shop"],
        "collect_sources": [{"site": 1234, "token": "src_shop"}],
        "mixpanel_tokens": ["mp_shop"],
        "mixpanel_secrets": ["mps_shop"],
    },
    {
        "name": "blog",
        "cohorly_tokens": ["tok_blog"],
        "client_keys": ["pk_blog"],
        "inslytic_keys": ["ins_blog"],
        "collect_sources": [{"site": 99, "token": "src_blog"}],
        "mixpanel_tokens": ["mp_blog"],
        "mixpanel_secrets": ["mps_blog"],
    },
]


def database_sink(engine: Any, *, clock: Any = now_ms, **options: Any) -> Sink:
    """The database sink over `engine`, not yet started (options: SinkOptions)."""
    return open_sink(SinkKind.DATABASE, engine, SinkOptions(**options), clock=clock)


def settings_for(backend: dict[str, str], **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "storage": {"url": backend["storage_url"]},
        "redis": {"url": backend["redis_url"], "key_prefix": backend["redis_prefix"]},
        "admin": {"keys": [ADMIN_KEY]},
        "projects": PROJECTS,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return from_dict(raw)


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Drive the ASGI lifespan protocol, as a server would."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        await task
        raise RuntimeError(f"startup failed: {started}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


@contextlib.asynccontextmanager
async def gateway(settings: Settings, client_ip: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """The app with its resources started, and an HTTP client bound to it."""
    app = build_app(settings)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app, client=(client_ip, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def events_of(client: httpx.AsyncClient, project: str = "shop", **params: str) -> list[dict[str, Any]]:
    """The project's stored events, through the admin API."""
    reply = await client.get(f"/admin/v1/projects/{project}/events", headers=ADMIN, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]  # type: ignore[no-any-return]


async def profile_of(client: httpx.AsyncClient, id_: str, project: str = "shop") -> dict[str, Any] | None:
    """The person of `id_`, or None when the admin API says 404."""
    reply = await client.get(f"/admin/v1/projects/{project}/profiles/{id_}", headers=ADMIN)
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def props_of(client: httpx.AsyncClient, id_: str, project: str = "shop") -> dict[str, Any] | None:
    found = await profile_of(client, id_, project)
    return None if found is None else found["properties"]


async def group_of(client: httpx.AsyncClient, group_key: str, group_id: str,
                   project: str = "shop") -> dict[str, Any] | None:
    """The group profile, or None when the admin API says 404."""
    reply = await client.get(f"/admin/v1/projects/{project}/groups/{group_key}/{group_id}", headers=ADMIN)
    if reply.status_code == 404:
        assert reply.json() == {"error": "no such group"}, reply.text
        return None
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def rejections_of(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    """The quarantine, through the admin API."""
    reply = await client.get("/admin/v1/rejections", headers=ADMIN, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["rejections"]  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_server(settings: Settings) -> Iterator[dict[str, str]]:
    """The app on `gateway.server`, as `dialgate serve` runs it (connection
    limits, header deadline, admin listener, TLS), in a thread on the loopback
    addresses of `settings`; yields {"public": url} and, with admin.bind,
    {"admin": url}."""
    from gateway import serve, tls
    from gateway.server import Limits, Listener

    app = build_app(settings)
    server, admin = settings.server, settings.admin
    public_tls = tls.certificate(server.certfile, server.keyfile, http2=server.h2c)
    listeners = [Listener(serve.bind_socket(server.bind, reuse_port=False), app, "public", public_tls)]
    urls = {"public": f"{tls.scheme(public_tls)}://{server.bind}"}
    if admin.bind:
        admin_tls = tls.certificate(admin.certfile, admin.keyfile, http2=server.h2c)
        listeners.append(Listener(serve.bind_socket(admin.bind, reuse_port=False), app.admin, "admin", admin_tls))
        urls["admin"] = f"{tls.scheme(admin_tls)}://{admin.bind}"
    limits = Limits(read_timeout=server.read_timeout, max_connections=server.max_connections, h2c=server.h2c)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    config = serve.hypercorn_config(graceful_timeout=4)
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(serve.serve(app, listeners, config, limits, stop.wait)),
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            # (Only whether it answers: a test's certificate is checked by the test.)
            if httpx.get(urls["public"] + "/healthz", timeout=1, verify=False).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield urls
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        loop.close()


@contextlib.contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The gateway's own server on a free loopback port, in a thread; yields its URL."""
    bound = msgspec.structs.replace(settings.server, bind=f"127.0.0.1:{free_port()}")
    with own_server(msgspec.structs.replace(settings, server=bound)) as urls:
        yield urls["public"]


class OwnRedis:
    """A redis-server of the test's own (the shared one is never stopped)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        from tests.conftest import unreachable

        binary = shutil.which("redis-server")
        if binary is None:
            unreachable("redis-server", "binary not on PATH")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            for _ in range(100):
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("own redis did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


@contextlib.contextmanager
def dialgate_serve(config: str, port: int, *, workers: int = 1, stderr: str) -> Iterator[subprocess.Popen[bytes]]:
    """`dialgate serve --config CONFIG` as a process of its own, serving on
    `port` (as CONFIG says) with `workers` worker processes (1: none); its
    stderr into the file `stderr`. Stopped with SIGTERM (and waited for) on
    leaving."""
    binary = Path(sys.executable).parent / "dialgate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}
    with open(stderr, "wb") as err:
        process = subprocess.Popen([str(binary), "serve", "--config", config], env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        # Generous: workers start slowly on a busy machine.
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError("dialgate serve exited: " + Path(stderr).read_text())
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and (workers == 1 or len(children_of(process.pid)) == workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("dialgate serve did not come up: " + Path(stderr).read_text())
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()



def _toml(value: Any) -> str:
    """A TOML value of the few kinds test configs hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def config_file(path: Path, backend: dict[str, str], port: int, **sections: dict[str, Any]) -> str:
    """A TOML file at `path` for `dialgate serve` on `port`: the backend's
    storage and Redis, the admin key, PROJECTS, and `sections` (their keys
    added to the tables of the same name)."""
    tables: dict[str, dict[str, Any]] = {
        "server": {"bind": f"127.0.0.1:{port}"},
        "storage": {"url": backend["storage_url"]},
        "redis": {"url": backend["redis_url"], "key_prefix": backend["redis_prefix"]},
        "admin": {"keys": [ADMIN_KEY]},
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
                   for name, values in tables.items())
    text += "".join("[[projects]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in project.items()) + "\n"
                    for project in PROJECTS)
    path.write_text(text, encoding="utf-8")
    return str(path)
