"""Real processes for the fault tests: `dialgate serve` subprocesses, load
threads sending Cohorly /track batches, and a direct count of stored ids."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import free_port

DIALGATE = Path(sys.executable).parent / "dialgate"
ADMIN_KEY = "adm_fault_key"
TOKEN = {"X-Cohorly-Token": "tok_shop"}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}


def config_text(port: int, storage_url: str, redis_url: str, prefix: str, extra: str = "") -> str:
    return f"""
[server]
bind = "127.0.0.1:{port}"
graceful_timeout = 10

[storage]
url = "{storage_url}"
unavailable_retry_after = 3

[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
retry_interval = 0.2

[admin]
keys = ["{ADMIN_KEY}"]

[[projects]]
name = "shop"
cohorly_tokens = ["tok_shop"]

[dialects.cohorly]
rate_limit = {{ requests = 1000000, per_seconds = 10 }}
{extra}
"""


class Gateway:
    """One `dialgate serve` in its own process group (so kill -9 takes it all)."""

    def __init__(self, tmp_path: Path, name: str, storage_url: str, redis_url: str, prefix: str,
                 extra: str = "", migrate: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / f"{name}.toml"
        text = config_text(self.port, storage_url, redis_url, prefix, extra)
        self.config.write_text(text, encoding="utf-8")
        self.err = tmp_path / f"{name}.err"
        self.out = tmp_path / f"{name}.out"
        self.migrate = migrate
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Gateway:
        args = [str(DIALGATE), "serve", "--config", str(self.config)]
        if not self.migrate:
            args.append("--no-migrate")
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                args, cwd=self.config.parent, env=clean_env(), stdout=out, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"gateway exited early: {self.stderr()}"
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gateway did not come up: {self.stderr()}"
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Always safe: SIGTERM, then SIGKILL of the group if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=12)
        except subprocess.TimeoutExpired:
            self.kill9()


def events(prefix: str, count: int) -> list[dict]:
    return [
        {"event": "Fault", "properties": {"distinct_id": f"u{i % 7}", "$insert_id": f"{prefix}-{i}"}}
        for i in range(count)
    ]


def batch_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


@dataclass
class Outcome:
    status: int | None = None          # None: connection error / no answer
    error: str = ""
    body: str = ""
    retry_after: str | None = None


def post_batch(client: httpx.Client, url: str, prefix: str, count: int, timeout: float = 10) -> Outcome:
    try:
        reply = client.post(url + "/track", headers=TOKEN, json=events(prefix, count), timeout=timeout)
    except httpx.HTTPError as exc:
        return Outcome(error=type(exc).__name__)
    return Outcome(
        status=reply.status_code, body=reply.text[:500], retry_after=reply.headers.get("retry-after")
    )


@dataclass
class Load:
    """Client threads each sending batches `run-<n>` until stopped; every
    attempt's outcome is recorded per batch prefix (in order)."""

    url_of: Callable[[], str]
    threads: int = 4
    size: int = 20
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    results: dict[str, list[Outcome]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0
    _workers: list[threading.Thread] = field(default_factory=list)
    max_batches: int = 5000

    def _next(self) -> str | None:
        with self._lock:
            if self._counter >= self.max_batches:
                return None
            self._counter += 1
            prefix = f"{self.tag}-b{self._counter}"
            self.results[prefix] = []
            return prefix

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                prefix = self._next()
                if prefix is None:
                    return
                outcome = post_batch(client, self.url_of(), prefix, self.size, timeout=5)
                with self._lock:
                    self.results[prefix].append(outcome)
                if outcome.status is None or outcome.status >= 500:
                    time.sleep(0.02)  # do not spin on a dead port

    def start(self) -> Load:
        for _ in range(self.threads):
            worker = threading.Thread(target=self._run, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def wait_for(self, acked: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.count(lambda o: o.status == 200) < acked:
            assert time.monotonic() < deadline, f"load did not reach {acked} acks: {self.summary()}"
            time.sleep(0.01)

    def count(self, pred: Callable[[Outcome], bool]) -> int:
        with self._lock:
            return sum(1 for outcomes in self.results.values() for o in outcomes if pred(o))

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=15)

    def acked(self) -> list[str]:
        with self._lock:
            return [p for p, outs in self.results.items() if any(o.status == 200 for o in outs)]

    def not_acked(self) -> list[str]:
        with self._lock:
            return [p for p, outs in self.results.items() if not any(o.status == 200 for o in outs)]

    def all_outcomes(self) -> list[Outcome]:
        with self._lock:
            return [o for outs in self.results.values() for o in outs]

    def summary(self) -> dict[str, int]:
        tally: dict[str, int] = {}
        for o in self.all_outcomes():
            key = str(o.status) if o.status is not None else o.error
            tally[key] = tally.get(key, 0) + 1
        return tally


def resend(url: str, prefixes: Iterable[str], size: int, attempts: int = 20) -> dict[str, Outcome]:
    """SDK-style: retry each batch until 200 (bounded)."""
    final: dict[str, Outcome] = {}
    with httpx.Client() as client:
        for prefix in prefixes:
            for _ in range(attempts):
                outcome = post_batch(client, url, prefix, size)
                if outcome.status == 200:
                    break
                time.sleep(0.1)
            final[prefix] = outcome
    return final


def pg_dsn(storage_url: str) -> str:
    return "postgresql://" + storage_url.removeprefix("postgresql+asyncpg://")


def stored_counts(storage_url: str, like: str) -> dict[str, int]:
    """insert_id -> number of rows, straight from the events table."""
    import asyncpg

    async def query() -> dict[str, int]:
        conn = await asyncpg.connect(pg_dsn(storage_url), timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT insert_id, count(*) AS n FROM events WHERE project = 'shop' AND insert_id LIKE $1 "
                "GROUP BY insert_id",
                like,
            )
        finally:
            await conn.close()
        return {r["insert_id"]: r["n"] for r in rows}

    return asyncio.run(query())


# Every fault's figures, for the terminal summary of the run.
FIGURES: list[str] = []


def figures(
    label: str, expected_ids: Iterable[str], acked_ids: Iterable[str], counts: dict[str, int]
) -> dict[str, int]:
    """acknowledged / stored / duplicates / missing, printed and returned."""
    expected = set(expected_ids)
    acked = set(acked_ids)
    result = {
        "acknowledged": len(acked),
        "stored": len(counts),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "missing": len(expected - counts.keys()),
        "acked_missing": len(acked - counts.keys()),
        "unexpected": len(counts.keys() - expected),
        # Committed but never acknowledged (answer lost in the fault): allowed.
        "stored_unacked": len(counts.keys() - acked),
    }
    line = f"[{label}] " + " ".join(f"{k}={v}" for k, v in result.items())
    print("\n" + line)
    FIGURES.append(line)  # shown in the run's summary, also in CI (see conftest)
    return result


def wait_ready(url: str, status: int, timeout: float = 10) -> float:
    """Poll /readyz until it answers `status`; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == status:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        assert time.monotonic() - started < timeout, f"/readyz never answered {status}"
        time.sleep(0.05)
