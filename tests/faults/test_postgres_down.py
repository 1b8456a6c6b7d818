"""PostgreSQL stopped (immediate) under load, on a cluster of the test's own:
503 + Retry-After and never a 2xx while it is down, /readyz says so, and the
same gateway recovers by itself; SDK retries land exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import unreachable
from tests.faults.harness import (
    Gateway,
    Load,
    Outcome,
    batch_ids,
    figures,
    post_batch,
    resend,
    stored_counts,
    wait_ready,
)
from tests.support import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class OwnPostgres:
    """initdb + pg_ctl as the postgres user, in a directory of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under tmp_path: pytest's base directory is 0700 root, unreadable to postgres.
        self.root = Path(tempfile.mkdtemp(prefix="dialgate-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    def _as_postgres(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                              timeout=timeout, check=True)

    def init(self) -> None:
        import pwd

        for binary in ("initdb", "pg_ctl"):
            if not (PG_BIN / binary).is_file():
                unreachable("PostgreSQL binaries", f"{PG_BIN / binary} missing")
        if shutil.which("runuser") is None:
            unreachable("runuser", "not on PATH")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            unreachable("PostgreSQL", "no postgres user to run initdb")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.root.chmod(0o700)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8")

    def start(self, wait: bool = True) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w" if wait else "-W", "-t", "30",
                          "-l", str(self.log),
                          "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def cleanup(self) -> None:
        if self.running():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class OutageRun:
    figures: dict[str, int]
    load: dict[str, int]
    probes: list[Outcome]             # sent while the cluster was stopped
    restart_probes: list[Outcome]     # sent back to back while it was starting again
    readyz_down: httpx.Response
    recovered_in: float
    after_recovery: list[Outcome]
    load_outcomes: list[Outcome]
    retried: dict[str, Outcome]
    stderr: str


def _start_cluster() -> OwnPostgres:
    import asyncpg

    server = OwnPostgres()
    server.init()
    server.start()

    async def create() -> None:
        conn = await asyncpg.connect(server.dsn(), timeout=5)
        try:
            await conn.execute("CREATE DATABASE dialgate")
        finally:
            await conn.close()

    asyncio.run(create())
    return server


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[OutageRun]:
    """One run of the scenario; the tests below each judge a part of it."""
    tmp_path = tmp_path_factory.mktemp("pgdown")
    server: OwnPostgres | None = None
    prefix = f"dialgate-test:{uuid.uuid4().hex}"
    gw: Gateway | None = None
    load: Load | None = None
    try:
        server = _start_cluster()
        storage_url = "postgresql+asyncpg://" + server.dsn("dialgate").removeprefix("postgresql://")
        gw = Gateway(tmp_path, "gw", storage_url, redis_server, prefix, migrate=True)
        gw.start()
        url = gw.url
        load = Load(url_of=lambda: url, threads=4, size=20)
        load.start()
        load.wait_for(20)
        server.stop("immediate")

        probes: dict[str, Outcome] = {}
        with httpx.Client() as client:
            for n in range(10):
                probes[f"{load.tag}-probe{n}"] = post_batch(client, url, f"{load.tag}-probe{n}", 20)
                time.sleep(0.05)
        readyz_down = httpx.get(url + "/readyz", timeout=5)
        time.sleep(0.5)

        # Start it again without waiting, and send while it is in crash recovery.
        server.start(wait=False)
        started = time.monotonic()
        restart_probes: dict[str, Outcome] = {}
        with httpx.Client() as client:
            for n in range(2000):
                name = f"{load.tag}-restart{n}"
                restart_probes[name] = post_batch(client, url, name, 20)
                if restart_probes[name].status == 200 or time.monotonic() - started > 20:
                    break
        recovered_in = wait_ready(url, 200, timeout=20)
        outage_batches = len(load.results)
        time.sleep(0.5)  # the load keeps running on the recovered gateway
        load.stop()
        after_recovery = [o for outs in list(load.results.values())[outage_batches:] for o in outs]

        # SDK-style retries of everything not acknowledged.
        refused = load.not_acked() + list(probes) + [p for p, o in restart_probes.items() if o.status != 200]
        retried = resend(url, refused, 20)
        all_prefixes = list(load.results) + list(probes) + list(restart_probes)
        expected = [i for p in all_prefixes for i in batch_ids(p, 20)]
        acked = load.acked() + [p for p, o in restart_probes.items() if o.status == 200]
        acked += [p for p, o in retried.items() if o.status == 200]
        counts = stored_counts(storage_url, load.tag + "-%")
        result = figures("postgres down", expected, [i for p in acked for i in batch_ids(p, 20)], counts)
        restart_tally: dict[str, int] = {}
        for o in restart_probes.values():
            restart_tally[str(o.status or o.error)] = restart_tally.get(str(o.status or o.error), 0) + 1
        print(f"[postgres down] load outcomes={load.summary()} "
              f"while stopped: probes={[(o.status, o.retry_after) for o in probes.values()]} "
              f"readyz={readyz_down.status_code}; during restart: {restart_tally}; "
              f"recovered {recovered_in:.2f}s after that; SDK retries={len(refused)} "
              f"acked={sum(1 for o in retried.values() if o.status == 200)}")
        yield OutageRun(result, load.summary(), list(probes.values()), list(restart_probes.values()),
                        readyz_down, recovered_in, after_recovery, load.all_outcomes(), retried, gw.stderr())
    finally:
        if load is not None:
            load.stop()
        if gw is not None:
            gw.stop()
        if server is not None:
            server.cleanup()
        import redis

        client = redis.Redis.from_url(redis_server)
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_database_down_refuses_with_503_and_recovers_exactly_once(outage: OutageRun) -> None:
    for o in outage.probes:
        assert o.status == 503 and o.retry_after and o.retry_after.isdigit(), o
        assert "Traceback" not in o.body and "asyncpg" not in o.body, o
    assert outage.readyz_down.status_code == 503, outage.readyz_down.text
    assert outage.readyz_down.json().get("database") is False, outage.readyz_down.text
    assert all(o.retry_after for o in outage.load_outcomes if o.status == 503)
    # Never a 2xx for unstored data, never a 500.
    everything = outage.load_outcomes + outage.restart_probes
    server_errors = [o for o in everything if o.status is not None and o.status >= 500 and o.status != 503]
    assert not server_errors, outage.load
    assert outage.figures["acked_missing"] == 0, outage.figures
    # The same process recovered, and SDK retries landed once each.
    after = outage.after_recovery
    assert after and all(o.status == 200 for o in after), after[:3]
    assert all(o.status == 200 for o in outage.retried.values()), outage.retried
    f = outage.figures
    assert (f["missing"], f["duplicates"], f["unexpected"]) == (0, 0, 0), f
    assert "Traceback" not in outage.stderr, outage.stderr[-3000:]


def test_database_starting_up_is_a_503_not_a_permanent_refusal(outage: OutageRun) -> None:
    everything = outage.load_outcomes + outage.restart_probes
    statuses = [o.status for o in everything]
    refused = [o for o in everything if o.status is not None and 400 <= o.status < 500]
    assert not refused, f"{len(refused)} of {len(statuses)} answered {refused[0].status}: {refused[0].body}"
