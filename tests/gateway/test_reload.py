"""gateway.reload: a new configuration file swapped into a running app.

In process first (the app of `build_app`, the Reloader `serve` installs on
SIGHUP), then for real: `dialgate serve` under a load of keep-alive
connections, with one worker and two, signalled directly and through
`dialgate reload`."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import build_app
from gateway.config import load
from gateway.reload import NoProcess, Reloader, find_pid, pid_file, restart_needed
from tests.support import free_port, lifespan

DIALGATE = Path(sys.executable).parent / "dialgate"
EVENT = {"event": "E", "properties": {"distinct_id": "u"}}


def _toml(db: Path, *, tokens: list[str], port: int = 8000, admin_key: str = "adm_one", extra: str = "",
          workers: int = 1, projects: str = "") -> str:
    return f"""
[server]
bind = "127.0.0.1:{port}"
workers = {workers}
graceful_timeout = 6
{extra}

[storage]
url = "sqlite+aiosqlite:///{db}"

[admin]
keys = ["{admin_key}"]

[[projects]]
name = "shop"
cohorly_tokens = {tokens!r}
inslytic_keys = ["ins_shop"]
{projects}
"""


class Running:
    """The app of a config file, started, with its Reloader and a client."""

    def __init__(self, path: Path, client: httpx.AsyncClient, reloader: Reloader) -> None:
        self.path, self.client, self.reload = path, client, reloader

    async def track(self, token: str) -> int:
        reply = await self.client.post("/track", headers={"X-Cohorly-Token": token}, json=EVENT)
        return reply.status_code


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    path = tmp_path / "dialgate.toml"
    path.write_text(_toml(tmp_path / "r.db", tokens=["tok_keep", "tok_old"]), encoding="utf-8")
    settings = load(path, environ={})
    app = build_app(settings)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Running(path, client, Reloader(app, settings, str(path)))



@pytest.mark.anyio
async def test_reload_swaps_credentials_projects_limits_and_dialects(
        running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert await running.track("tok_old") == 200
    assert await running.track("tok_new") == 401
    admin_blog = await running.client.get("/admin/v1/projects/blog/events", headers={"Authorization": "Bearer adm_one"})
    assert admin_blog.status_code == 404
    running.path.write_text(_toml(
        tmp_path / "r.db", tokens=["tok_keep", "tok_new"], admin_key="adm_two",
        extra="", projects='[[projects]]\nname = "blog"\ncohorly_tokens = ["tok_blog"]\n\n'
                          "[limits]\nper_ip = { requests = 3, per_seconds = 60 }\n\n"
                          "[dialects.inslytic]\nenabled = false\n"), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="dialgate"):
        assert running.reload() is True
    assert "configuration reloaded from" in caplog.text
    assert "2 projects; added blog; changed: projects, dialects, limits, admin.keys" in caplog.text
    assert "need a restart" not in caplog.text
    # The new credentials, the old one gone, the new per-IP window (3 a minute).
    assert [await running.track(t) for t in ("tok_new", "tok_old", "tok_blog", "tok_keep")] == [200, 401, 200, 429]
    # A dialect disabled: its path is no longer routed.
    reply = await running.client.post("/v1/ingest", headers={"Authorization": "Bearer ins_shop"}, json=[])
    assert reply.status_code == 404
    # Admin keys and the projects the admin API knows.
    old_key = await running.client.get("/admin/v1/projects/blog/events", headers={"Authorization": "Bearer adm_one"})
    assert old_key.status_code == 401
    new_key = await running.client.get("/admin/v1/projects/blog/events", headers={"Authorization": "Bearer adm_two"})
    assert new_key.status_code == 200 and len(new_key.json()["events"]) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(("text", "reason"), [
    ("[server\nbind =", "invalid TOML"),
    (None, "duplicate project 'shop'"),
    ("[dialects.cohorly]\nmax_batch = 0\n", "dialects.cohorly.max_batch: must be greater than 0"),
    ("[limits]\nper_ipp = 3\n", "limits.per_ipp: unknown key"),
])
async def test_a_file_that_does_not_load_is_refused_and_the_old_configuration_serves(
        running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str | None, reason: str) -> None:
    if text is None:
        text = _toml(tmp_path / "r.db", tokens=["tok_new"], projects='[[projects]]\nname = "shop"\n')
    running.path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="dialgate"):
        assert running.reload() is False
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 1 and reason in refused[0], caplog.text
    assert "the running configuration is kept" in refused[0]
    assert "configuration reloaded" not in caplog.text
    assert [await running.track(t) for t in ("tok_old", "tok_keep", "tok_new")] == [200, 200, 401]


@pytest.mark.anyio
async def test_a_missing_file_is_refused(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    running.path.unlink()
    assert running.reload() is False
    assert "reload refused: cannot read" in caplog.text
    assert await running.track("tok_old") == 200


@pytest.mark.anyio
async def test_restart_only_settings_are_named_and_kept_the_rest_applied(
        running: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Another bind, storage URL (with a password) and read timeout, a new key.
    text = _toml(tmp_path / "r.db", tokens=["tok_keep", "tok_new"], port=9999, extra="read_timeout = 5")
    text = text.replace(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "postgresql+asyncpg://u:s3cret@db/x")
    running.path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="dialgate"):
        assert running.reload() is True
    warned = [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]
    assert warned == ["reload: server.bind, server.read_timeout, storage.url changed; these need a restart, "
                      "the running values are kept"], caplog.text
    assert "s3cret" not in caplog.text
    # Still storing in the SQLite file it started with; the new key works.
    assert await running.track("tok_new") == 200
    reply = await running.client.get("/admin/v1/projects/shop/events", headers={"Authorization": "Bearer adm_one"})
    assert len(reply.json()["events"]) == 1
    # Reloading the same file again: the restart is still pending, said again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dialgate"):
        assert running.reload() is True
    assert "server.bind, server.read_timeout, storage.url changed" in caplog.text
    assert "nothing changed" in caplog.text


@pytest.mark.anyio
async def test_a_request_in_flight_finishes_on_the_configuration_it_started_on(
        running: Running, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"event": "E", "properties": {"distinct_id": "u",'
        await release.wait()
        yield b' "x": 1}}'

    slow = asyncio.create_task(running.client.post(
        "/track", headers={"X-Cohorly-Token": "tok_old", "Content-Type": "application/json"}, content=body()))
    await asyncio.sleep(0.2)
    running.path.write_text(_toml(tmp_path / "r.db", tokens=["tok_new"]), encoding="utf-8")
    assert running.reload() is True
    assert await running.track("tok_old") == 401  # a new request: the new configuration
    release.set()
    reply = await slow
    assert reply.status_code == 200, reply.text  # the old one: the configuration it started on


def test_restart_needed_names_keys_outside_the_reloaded_sections(tmp_path: Path) -> None:
    base = _toml(tmp_path / "a.db", tokens=["t"])
    before = load_text(tmp_path, base)
    assert restart_needed(before, load_text(tmp_path, base)) == []
    changed = base.replace('keys = ["adm_one"]', 'keys = ["adm_two"]\nbind = "127.0.0.1:9100"').replace(
        "workers = 1", "workers = 3\npid_file = \"/tmp/x.pid\"") + '\n[sink]\nkind = "database"\n'
    changed += "[quarantine]\nper_minute = 5\n[redis]\nkey_prefix = \"other\"\n"
    assert restart_needed(before, load_text(tmp_path, changed)) == [
        "admin.bind", "quarantine.per_minute", "redis.key_prefix", "server.pid_file", "server.workers"]


def load_text(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return load(path, environ={})


def test_pid_file_is_written_and_removed_and_found(tmp_path: Path) -> None:
    path = tmp_path / "run" / "dialgate.pid"
    path.parent.mkdir()
    settings = load_text(tmp_path, _toml(tmp_path / "a.db", tokens=["t"], extra=f'pid_file = "{path}"'))
    with pid_file(str(path)):
        assert path.read_text() == f"{os.getpid()}\n"
        assert find_pid(None, None, settings) == os.getpid()
    assert not path.exists()
    assert find_pid(42, None, settings) == 42
    with pytest.raises(NoProcess, match=r"pid file .*: No such file or directory \(is the gateway running\?\)"):
        find_pid(None, None, settings)
    (tmp_path / "junk.pid").write_text("abc")
    with pytest.raises(NoProcess, match="holds no pid"):
        find_pid(None, str(tmp_path / "junk.pid"), settings)
    with pytest.raises(NoProcess, match=r"give --pid or --pid-file, or set server\.pid_file"):
        find_pid(None, None, load_text(tmp_path, _toml(tmp_path / "a.db", tokens=["t"])))


# -- for real: `dialgate serve` under load -------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


# The load comes from one address: past Cohorly's own window (100 per 10 s).
UNLIMITED = "[dialects.cohorly]\nrate_limit = { requests = 1000000, per_seconds = 1 }\n"


class Gateway:
    def __init__(self, tmp_path: Path, workers: int) -> None:
        self.tmp_path, self.workers = tmp_path, workers
        self.port = free_port()
        self.config = tmp_path / "dialgate.toml"
        self.pid_path = tmp_path / "dialgate.pid"
        self.log = tmp_path / "err.log"
        self.write(["tok_keep", "tok_old"])
        with self.log.open("wb") as err:
            self.process = subprocess.Popen([str(DIALGATE), "serve", "--config", str(self.config)], cwd=tmp_path,
                                            env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                up = httpx.get(self.base + "/healthz", timeout=1).status_code == 200
                # Every worker has read the file and serves: a test may edit it now.
                if up and (workers == 1 or self._serving() == workers):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.process.kill()
        raise AssertionError("gateway did not come up: " + self.log.read_text())

    def _serving(self) -> int:
        return len(re.findall(r"dialgate worker \d+ serving", self.log.read_text()))

    def write(self, tokens: list[str], text: str | None = None) -> None:
        self.config.write_text(text if text is not None else _toml(
            self.tmp_path / "g.db", tokens=tokens, port=self.port, workers=self.workers,
            extra=f'pid_file = "{self.pid_path}"', projects=UNLIMITED), encoding="utf-8")

    def statuses(self, token: str, n: int) -> list[int]:
        """`n` requests, each on a fresh connection (spread over the workers)."""
        codes = []
        for _ in range(n):
            with httpx.Client(base_url=self.base, timeout=10) as client:
                codes.append(client.post("/track", headers={"X-Cohorly-Token": token, "Connection": "close"},
                                         json=EVENT).status_code)
        return codes

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                assert self.process.wait(timeout=20) == 0
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
        return self.log.read_text()


def _keep_alive_loop(port: int, stop: threading.Event, results: list[tuple[int, int]], errors: list[str],
                     answered: list[int]) -> None:
    """Requests one after another on ONE connection until `stop`: a
    connection closed without `Connection: close` or a status other than 200 is a failure. Every
    answer is counted in `answered` as it comes."""
    body = b'{"event": "E", "properties": {"distinct_id": "u"}}'
    request = (b"POST /track HTTP/1.1\r\nHost: gw\r\nX-Cohorly-Token: tok_keep\r\n"
               b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    ok = failed = 0
    try:
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                buffer = b""
                closing = False
                while not stop.is_set() and not closing:
                    sock.sendall(request)
                    while b"\r\n\r\n" not in buffer:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("closed by the server")
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    lines = head.lower().split(b"\r\n")
                    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
                    # An answer saying `Connection: close` (hypercorn's
                    # keep_alive_max_requests, 1,000) is whole: a client opens
                    # another connection, as any HTTP client does.
                    closing = b"connection: close" in lines
                    while len(buffer) < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("closed by the server mid-answer")
                        buffer += chunk
                    buffer = buffer[length:]
                    answered.append(1)
                    if head.startswith(b"HTTP/1.1 200 "):
                        ok += 1
                    else:
                        failed += 1
    except OSError as exc:
        errors.append(repr(exc))
    results.append((ok, failed))


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_under_load_drops_nothing_and_swaps_the_keys(tmp_path: Path, workers: int) -> None:
    gateway = Gateway(tmp_path, workers)
    try:
        stop, results, errors, answered = threading.Event(), [], [], []  # type: ignore[var-annotated]
        clients = [threading.Thread(target=_keep_alive_loop, args=(gateway.port, stop, results, errors, answered))
                   for _ in range(6)]
        for client in clients:
            client.start()
        time.sleep(1.0)
        gateway.write(["tok_keep", "tok_new"])  # tok_old removed, tok_new added
        if workers == 1:
            gateway.process.send_signal(signal.SIGHUP)
        else:
            done = subprocess.run([str(DIALGATE), "reload", "--config", str(gateway.config)], env=_env(),
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert f"sent SIGHUP to {gateway.process.pid}" in done.stdout
        deadline = time.monotonic() + 20
        while gateway.log.read_text().count("configuration reloaded") < workers:
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.1)
        at_swap = len(answered)
        time.sleep(1.0)  # load goes on after the swap too
        stop.set()
        for client in clients:
            client.join(timeout=30)
        assert errors == []
        assert len(results) == 6 and all(failed == 0 for _, failed in results), results
        served = sum(ok for ok, _ in results)
        print(f"workers={workers}: {served} requests on 6 keep-alive connections, {at_swap} of them before "
              "the last worker's swap, 0 failed")
        # Every connection was served, before the swap and after it.
        assert all(ok > 0 for ok, _ in results) and 0 < at_swap < served, (at_swap, results)
        assert gateway.statuses("tok_new", 12) == [200] * 12
        assert gateway.statuses("tok_old", 12) == [401] * 12
        assert gateway.statuses("tok_keep", 4) == [200] * 4
    finally:
        log = gateway.stop()
    assert log.count("configuration reloaded") == workers, log
    assert "Traceback" not in log and "need a restart" not in log, log
    assert not gateway.pid_path.exists()


def test_an_invalid_file_is_refused_by_the_supervisor_and_the_old_keeps_serving(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, 2)
    try:
        # Two projects with one token: refused by `dialgate reload` (nothing sent) ...
        text = _toml(tmp_path / "g.db", tokens=["tok_new"], port=gateway.port, workers=2,
                     projects='[[projects]]\nname = "blog"\ncohorly_tokens = ["tok_new"]\n')
        gateway.write([], text)
        done = subprocess.run([str(DIALGATE), "reload", "--config", str(gateway.config),
                               "--pid-file", str(gateway.pid_path)], env=_env(),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "also used by project 'shop'" in done.stderr, done.stderr
        # ... and by the supervisor, sent the signal anyway: the workers never get it.
        gateway.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload refused" not in gateway.log.read_text():
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        assert gateway.statuses("tok_old", 8) == [200] * 8
        assert gateway.statuses("tok_new", 8) == [401] * 8
    finally:
        log = gateway.stop()
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 1, log
    assert "also used by project 'shop'" in refused[0] and "the running configuration is kept" in refused[0]
    assert "configuration reloaded" not in log and "Traceback" not in log, log


def test_reload_without_a_pid_says_what_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(_toml(tmp_path / "a.db", tokens=["t"]), encoding="utf-8")
    done = subprocess.run([str(DIALGATE), "reload", "--config", str(config)], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip() == "dialgate: reload: no gateway pid: give --pid or --pid-file, or set server.pid_file"
    # A pid nobody has (pid_max is at most 2**22).
    done = subprocess.run([str(DIALGATE), "reload", "--config", str(config), "--pid", str(2**22 + 1)], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no process 4194305 (a stale pid file?)" in done.stderr


def test_a_sighup_while_the_workers_start_is_applied_once_they_serve(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "dialgate.toml"
    config.write_text(_toml(tmp_path / "s.db", tokens=["tok_old"], port=port, workers=2), encoding="utf-8")
    log = tmp_path / "err.log"
    with log.open("wb") as err:
        process = subprocess.Popen([str(DIALGATE), "serve", "--config", str(config)], cwd=tmp_path, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        # The supervisor says so just before it starts the workers.
        deadline = time.monotonic() + 60
        while "with 2 workers" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        config.write_text(_toml(tmp_path / "s.db", tokens=["tok_new"], port=port, workers=2), encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        while log.read_text().count("configuration reloaded") < 2:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        # Held by each worker until it could reload, not lost while it started.
        assert all(text.index(f"worker {pid} serving") < text.index(f"worker {pid}: configuration reloaded")
                   for pid in _children(process.pid)), text
        base = f"http://127.0.0.1:{port}"
        for token, status in (("tok_new", 200), ("tok_old", 401)):
            for _ in range(8):
                with httpx.Client(base_url=base, timeout=10) as client:
                    reply = client.post("/track", headers={"X-Cohorly-Token": token, "Connection": "close"},
                                        json=EVENT)
                    assert reply.status_code == status, (token, reply.text)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
