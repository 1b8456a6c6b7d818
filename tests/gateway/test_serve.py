"""`server.workers` > 1: a supervisor and worker processes, each listening on
its own SO_REUSEPORT socket; run for real with the console script."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import free_port

DIALGATE = Path(sys.executable).parent / "dialgate"


def _config(tmp_path: Path, port: int, workers: int) -> Path:
    config = tmp_path / "dialgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
workers = {workers}
graceful_timeout = 6

[storage]
url = "sqlite+aiosqlite:///{tmp_path / 'workers.db'}"

[redis]
url = ""

[[projects]]
name = "shop"
cohorly_tokens = ["tok_w"]
""",
        encoding="utf-8",
    )
    return config


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not serving.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _start(tmp_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = _config(tmp_path, port, workers)
    with open(tmp_path / "err.log", "wb") as err:
        process = subprocess.Popen([str(DIALGATE), "serve", "--config", str(config)], cwd=tmp_path, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "err.log").read_text()
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200 and len(_children(process.pid)) == workers:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("gateway did not come up: " + (tmp_path / "err.log").read_text())


def _track(base: str, n: int) -> httpx.Response:
    # A fresh connection each time, so the kernel spreads them over the workers.
    with httpx.Client(base_url=base, timeout=10) as client:
        return client.post("/track", headers={"X-Cohorly-Token": "tok_w", "Connection": "close"},
                           json={"event": "E", "properties": {"distinct_id": "u", "$insert_id": f"w{n}"}})


def test_two_workers_serve_store_and_stop_together_on_sigterm(tmp_path: Path) -> None:
    process, base = _start(tmp_path, 2)
    try:
        workers = _children(process.pid)
        assert len(workers) == 2
        replies = [_track(base, n) for n in range(40)]
        assert [r.status_code for r in replies] == [200] * 40
        assert all(r.json() == {"status": 1, "inserted": 1} for r in replies)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - started < 6 + 2
        assert not any(_alive(pid) for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()
    err = (tmp_path / "err.log").read_text()
    assert "Traceback" not in err, err
    with sqlite3.connect(tmp_path / "workers.db") as db:
        assert db.execute("SELECT count(*), count(DISTINCT insert_id) FROM events").fetchone() == (40, 40)


def _tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets on local `port` in `state` (0A listen, 01 established)."""
    inodes: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def test_each_worker_listens_on_its_own_socket_and_takes_connections(tmp_path: Path) -> None:
    process, base = _start(tmp_path, 2)
    port = int(base.rsplit(":", 1)[1])
    clients = [httpx.Client(base_url=base, timeout=10) for _ in range(24)]
    try:
        workers = _children(process.pid)
        listening = _tcp_sockets(port, "0A")
        assert len(listening) == 2
        assert all(len(_socket_inodes(pid) & listening) == 1 for pid in workers)
        # 24 kept-alive connections: the kernel spreads them over both sockets.
        for client in clients:
            assert client.get("/healthz").status_code == 200
        established = _tcp_sockets(port, "01")
        per_worker = [len(_socket_inodes(pid) & established) for pid in workers]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
    finally:
        for client in clients:
            client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


def test_a_worker_that_dies_stops_the_gateway(tmp_path: Path) -> None:
    process, _base = _start(tmp_path, 2)
    try:
        first, second = _children(process.pid)
        os.kill(first, signal.SIGKILL)
        # The supervisor stops the other worker and exits non-zero, so the
        # service manager restarts the whole gateway.
        assert process.wait(timeout=15) == 1
        assert not _alive(second)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_taken_port_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, port, 1)
        result = subprocess.run([str(DIALGATE), "serve", "--config", str(config)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def _port_free(port: int) -> bool:
    return not _tcp_sockets(port, "0A")


def test_workers_stop_and_free_the_port_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    process, base = _start(tmp_path, 2)
    port = int(base.rsplit(":", 1)[1])
    workers = _children(process.pid)
    try:
        assert _track(base, 1).status_code == 200
        process.kill()  # SIGKILL: the supervisor cannot pass anything on
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) or not _port_free(port):
            assert time.monotonic() < deadline, (
                f"orphaned workers still alive: {[pid for pid in workers if _alive(pid)]}, "
                f"port listening: {not _port_free(port)}")
            time.sleep(0.1)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    # The port can be listened on again at once, without SO_REUSEPORT (which
    # would share it with a leftover listener); SO_REUSEADDR, as the gateway
    # binds, only passes the closed connections' TIME_WAIT.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    with sqlite3.connect(tmp_path / "workers.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (1,)


def test_sighup_reloads_in_place_and_sigterm_still_stops_everything(tmp_path: Path) -> None:
    process, base = _start(tmp_path, 2)
    workers = sorted(_children(process.pid))
    try:
        # To the supervisor, and to the whole group as a closed terminal would.
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        for pid in workers:
            os.kill(pid, signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None
        assert sorted(_children(process.pid)) == workers
        assert all(_alive(pid) for pid in workers)
        replies = [_track(base, n) for n in range(10)]
        assert [r.status_code for r in replies] == [200] * 10
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert not any(_alive(pid) for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()
    err = (tmp_path / "err.log").read_text()
    # The supervisor's SIGHUP reached both workers, and each worker's own
    # made it reload once more: the same processes, the same file.
    assert err.count("configuration reloaded") == 4, err
    assert err.count("1 projects; nothing changed") == 4, err
    assert "Traceback" not in err, err
