"""PostgreSQL connections terminated under load, and the network to PostgreSQL
cut and restored under load, against real `dialgate serve` processes:
acknowledged = stored, 0 duplicates after SDK-style retries, and no 4xx
answered to a valid request (a 4xx makes an SDK drop the batch)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_DSN, unreachable
from tests.faults.harness import (
    ADMIN_KEY,
    TOKEN,
    Gateway,
    Load,
    Outcome,
    batch_ids,
    figures,
    pg_dsn,
    resend,
    stored_counts,
)
from tests.faults.proxy import TcpProxy


@dataclass
class Run:
    figures: dict[str, int]
    outcomes: list[Outcome]
    retried: dict[str, Outcome]
    faults: int
    stderr: str
    profile_statuses: list[int]
    profile_missing: list[int]


class ProfileLoad:
    """A thread sending /engage $union of one new number at a time to one
    person (identity and profile work: the ordered lane, pooled connections),
    again after a 503 as an SDK does; every number must land once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.acked: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = {"$distinct_id": "fault-person", "$union": {"l": [n]}}
                for _ in range(50):
                    try:
                        reply = client.post(self.url + "/engage", headers=TOKEN, json=body)
                    except httpx.HTTPError:
                        time.sleep(0.05)
                        continue
                    self.statuses.append(reply.status_code)
                    if reply.status_code != 503:
                        break
                    time.sleep(0.05)
                if self.statuses and self.statuses[-1] == 200:
                    self.acked.append(n)
                n += 1
                time.sleep(0.01)

    def start(self) -> ProfileLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def missing(self) -> list[int]:
        reply = httpx.get(self.url + "/admin/v1/projects/shop/profiles/fault-person",
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
        assert reply.status_code == 200, reply.text
        stored = reply.json()["properties"]["l"]
        assert len(stored) == len(set(stored)), "a number stored twice"
        return sorted(set(self.acked) - set(stored))


def _admin(sql: str, dsn: str = PG_ADMIN_DSN) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def database(redis_server: str) -> Iterator[str]:
    """A database of the scenario's own on the shared server (the gateway migrates it)."""
    name = f"dialgate_fault_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        unreachable("PostgreSQL", f"{PG_ADMIN_DSN}: {exc}")
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    yield "postgresql+asyncpg://" + f"{base}/{name}".removeprefix("postgresql://")
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scenario(label: str, tmp_path: Path, storage_url: str, check_url: str, redis_url: str,
              fault: callable) -> Run:  # type: ignore[valid-type]
    prefix = f"dialgate-test:{uuid.uuid4().hex}"
    gw = Gateway(tmp_path, "gw", storage_url, redis_url, prefix, migrate=True)
    load: Load | None = None
    try:
        gw.start()
        url = gw.url
        load = Load(url_of=lambda: url, threads=4, size=20)
        load.start()
        profiles = ProfileLoad(url).start()
        load.wait_for(20)
        faults = fault()
        time.sleep(1.0)  # the load goes on after the last fault
        load.wait_for(load.count(lambda o: o.status == 200) + 20)
        load.stop()
        profiles.stop()
        retried = resend(url, load.not_acked(), 20)
        acked = load.acked() + [p for p, o in retried.items() if o.status == 200]
        expected = [i for p in load.results for i in batch_ids(p, 20)]
        counts = stored_counts(check_url, load.tag + "-%")
        result = figures(label, expected, [i for p in acked for i in batch_ids(p, 20)], counts)
        print(f"[{label}] load outcomes={load.summary()} faults={faults} SDK retries={len(retried)}")
        return Run(result, load.all_outcomes(), retried, faults, gw.stderr(), profiles.statuses,
                   profiles.missing())
    finally:
        if load is not None:
            load.stop()
        gw.stop()


def _judge(run: Run) -> None:
    refused = [o for o in run.outcomes if o.status is not None and 400 <= o.status < 500]
    assert not refused, f"{len(refused)} answered {refused[0].status}: {refused[0].body}"
    others = [o for o in run.outcomes if o.status not in (200, 503)]
    assert not others, others[:3]
    assert all(o.retry_after and o.retry_after.isdigit() for o in run.outcomes if o.status == 503)
    assert all(o.status == 200 for o in run.retried.values()), run.retried
    f = run.figures
    assert f["acked_missing"] == 0, f
    assert (f["missing"], f["duplicates"], f["unexpected"]) == (0, 0, 0), f
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.profile_statuses and set(run.profile_statuses) <= {200, 503}, sorted(set(run.profile_statuses))
    assert run.profile_missing == [], run.profile_missing


def test_postgres_connections_terminated_under_load(tmp_path: Path, database: str, redis_server: str) -> None:
    dbname = make_url(database).database

    def terminate() -> int:
        killed = 0
        for _ in range(6):
            killed += int(_admin(  # type: ignore[call-overload]
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{dbname}' AND application_name = 'dialgate') AS t"))
            time.sleep(0.3)
        return killed

    run = _scenario("postgres connections terminated", tmp_path, database, database, redis_server, terminate)
    assert run.faults >= 6, run.faults  # connections were there to terminate, each time
    _judge(run)


def test_network_to_postgres_cut_and_restored_under_load(tmp_path: Path, database: str,
                                                         redis_server: str) -> None:
    url = make_url(database)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)

        def cut() -> int:
            for pause in (1.5, 0.2, 0.0):
                proxy.cut()
                time.sleep(pause)
                proxy.restore()
                time.sleep(0.5)
            return 3

        run = _scenario("network to postgres cut", tmp_path, proxied, database, redis_server, cut)
    _judge(run)
    assert pg_dsn(database)  # the counts were read around the proxy, straight from the server
