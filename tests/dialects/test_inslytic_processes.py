"""Inslytic's per-project token bucket across real `dialgate serve` processes.

With Redis the bucket lives in Redis, so every gateway process sharing it
draws from one budget. Without Redis each process keeps its own bucket in
memory: N processes admit up to N times `events_per_minute` between them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port

DIALGATE = Path(sys.executable).parent / "dialgate"
ADMIN_KEY = "adm_proc_key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHOP = {"Authorization": "Bearer ins_shop"}
MB = 1024 * 1024


def config_text(port: int, storage_url: str, redis_url: str, prefix: str, per_minute: int) -> str:
    return f"""
[server]
bind = "127.0.0.1:{port}"

[storage]
url = "{storage_url}"

[redis]
url = "{redis_url}"
key_prefix = "{prefix}"

[admin]
keys = ["{ADMIN_KEY}"]

[[projects]]
name = "shop"
inslytic_keys = ["ins_shop"]

[dialects.inslytic]
events_per_minute = {per_minute}
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}


@contextlib.contextmanager
def servers(tmp_path: Path, configs: list[str], migrate: bool) -> Iterator[list[str]]:
    """Start one `dialgate serve` per config, wait for all; always stop them."""
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    urls: list[str] = []
    try:
        for index, text in enumerate(configs):
            path = tmp_path / f"gateway{index}.toml"
            path.write_text(text, encoding="utf-8")
            port = int(text.split('bind = "127.0.0.1:', 1)[1].split('"', 1)[0])
            err = tmp_path / f"gateway{index}.err"
            args = [str(DIALGATE), "serve", "--config", str(path)]
            if not migrate:
                args.append("--no-migrate")
            with (tmp_path / f"gateway{index}.out").open("wb") as out, err.open("wb") as errors:
                process = subprocess.Popen(args, cwd=tmp_path, env=clean_env(), stdout=out, stderr=errors)
            processes.append((process, err))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for (process, err), url in zip(processes, urls, strict=True):
            while True:
                assert process.poll() is None, f"server exited early: {err.read_text()}"
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"server did not come up: {err.read_text()}"
                time.sleep(0.05)
        yield urls
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for _, err in processes:
        assert "Traceback" not in err.read_text(), err.read_text()


def batch(prefix: str, count: int) -> dict[str, Any]:
    return {
        "events": [
            {
                "eventName": f"{prefix}{i}",
                "timestamp": "2026-02-16T10:30:00.000Z",
                "anonymousId": "anon-1",
                "sessionId": "",
                "consentGiven": True,
            }
            for i in range(count)
        ]
    }


def send(url: str, prefix: str, count: int) -> httpx.Response:
    return httpx.post(url + "/v1/ingest", headers=SHOP, json=batch(prefix, count), timeout=10)


def stored_names(url: str) -> list[str]:
    reply = httpx.get(
        url + "/admin/v1/projects/shop/events", headers=ADMIN, params={"limit": 1000}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    return [e["name"] for e in reply.json()["events"]]


def assert_rate_limited(reply: httpx.Response) -> None:
    assert (reply.status_code, reply.json()) == (429, {"error": "Rate limit exceeded"}), reply.text
    wait = reply.headers["retry-after"]
    assert wait.isdigit() and 1 <= int(wait) <= 60, wait


def test_two_processes_share_one_bucket_through_redis(tmp_path: Path, postgres_backend) -> None:
    # postgres_backend: the migrated test database, emptied, and Redis; its
    # key prefix is unique to this test and its keys are deleted afterwards.
    storage_url, redis_url = postgres_backend["storage_url"], postgres_backend["redis_url"]
    prefix = postgres_backend["redis_prefix"]
    configs = [config_text(free_port(), storage_url, redis_url, prefix, 10) for _ in range(2)]
    # The fixture migrated the database: two processes need not race to do it.
    with servers(tmp_path, configs, migrate=False) as (a, b):
        reply = send(a, "a", 6)
        assert (reply.status_code, reply.json()) == (202, {"accepted": 6})
        # Only 4 of the 10 tokens are left, and B sees the same bucket.
        assert_rate_limited(send(b, "b", 6))
        assert_rate_limited(send(a, "a", 5))
        reply = send(b, "c", 4)
        assert (reply.status_code, reply.json()) == (202, {"accepted": 4})
        assert_rate_limited(send(a, "d", 1))
        assert_rate_limited(send(b, "d", 1))
        expected = [f"a{i}" for i in range(6)] + [f"c{i}" for i in range(4)]
        # One database behind both: each process reads the same 10 events.
        assert stored_names(a) == expected
        assert stored_names(b) == expected


def test_without_redis_each_process_has_its_own_bucket(tmp_path: Path) -> None:
    # Documented behaviour without Redis: the bucket is in-process, so two
    # gateways admit 10 events each. Each has its own SQLite file here (two
    # processes writing one SQLite file is not a supported deployment).
    prefix = f"unused-{uuid.uuid4().hex}"
    configs = [
        config_text(free_port(), f"sqlite+aiosqlite:///{tmp_path}/gateway{i}.db", "", prefix, 10)
        for i in range(2)
    ]
    with servers(tmp_path, configs, migrate=True) as (a, b):
        assert send(a, "a", 6).json() == {"accepted": 6}
        reply = send(b, "b", 6)
        assert (reply.status_code, reply.json()) == (202, {"accepted": 6})
        assert send(b, "c", 4).json() == {"accepted": 4}
        assert_rate_limited(send(b, "d", 1))
        assert send(a, "e", 4).json() == {"accepted": 4}
        assert_rate_limited(send(a, "f", 1))
        assert stored_names(a) == [f"a{i}" for i in range(6)] + [f"e{i}" for i in range(4)]
        assert stored_names(b) == [f"b{i}" for i in range(6)] + [f"c{i}" for i in range(4)]

        # Over a real socket, an oversized body gets its 413 delivered (not a
        # reset), so the SDK can halve its batch.
        big = b'{"events":[],"pad":"' + b"x" * (5 * MB) + b'"}'
        reply = httpx.post(a + "/v1/ingest", headers=SHOP, content=big, timeout=30)
        assert (reply.status_code, reply.json()) == (413, {"error": "Payload too large"})
