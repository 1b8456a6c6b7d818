"""Hostile-caller scenarios on ONE worker: what a caller holding only public
credentials (or none) costs the gateway. Prints one table; asserts nothing.

    .venv/bin/python bench/hostile.py              # SQLite, in-process limits
    .venv/bin/python bench/hostile.py --pg         # PostgreSQL + Redis on 127.0.0.1
    .venv/bin/python bench/hostile.py --requests 500 --union-bytes 300000

(a) CPU per refused request: the worker's CPU time (utime + stime from
    /proc/<pid>/stat) over N sequential refused requests, divided by N; a
    429 (Cohorly /track over its per-IP limit) and 401s (client API and
    Inslytic with a wrong key), each with a small body and with a ~1 KB gzip
    bomb (`[{},{},...]`: deflate inflates at most ~1,030 times, so 1 KB
    makes ~1 MB; `--bomb-kb` for more).
(c) Peak RSS growth of the worker while 60 keyless connections each declare
    a 5 MB body to /v1/ingest and send it slowly.
(b) Worst-case /healthz latency (polled every ~10 ms on its own connection)
    while one worst-case request runs: a client-API batch of `[{},{},...]`
    gzip, a valid 1,000-event client batch, and an /engage `$union` of as
    many numbers as fit in `--union-bytes` (default 1 MB; run last, as it
    may keep the worker busy past `--heavy-timeout`).

Everything on loopback; the gateway is a real `dialgate serve` process with
`server.workers = 1` (the process is the worker).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from run import PY, Process, free_port  # bench/run.py: the same way of starting a gateway

TICK = os.sysconf("SC_CLK_TCK")
NONCE = uuid.uuid4().hex[:8]
AIMS = {"cpu": "< 1 ms", "healthz": "< 100 ms", "rss": "< 100 MB"}


def config(path: Path, port: int, storage: str, redis_url: str) -> None:
    path.write_text(f"""
[server]
bind = "127.0.0.1:{port}"
workers = 1
trusted_proxies = ["127.0.0.1/32"]
[storage]
url = "{storage}"
[redis]
url = "{redis_url}"
key_prefix = "dialgate-hostile-{NONCE}"
[admin]
keys = ["adm_hostile"]
[[projects]]
name = "bench"
cohorly_tokens = ["tok_bench"]
client_keys = ["pk_bench"]
inslytic_keys = ["ins_bench"]
[dialects.cohorly]
rate_limit = {{ requests = 1, per_seconds = 3600 }}
""")


def cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 (utime, stime) after the command name in parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bomb(kb: int) -> bytes:
    """The longest `[{},{},...]` whose gzip stays within `kb` KB."""
    low, high = 1, 50_000_000
    best = gzip.compress(b"[{}]", 9)
    while low <= high:
        n = (low + high) // 2
        packed = gzip.compress(b"[" + b"{}," * n + b"{}]", 9)
        if len(packed) <= kb * 1024:
            best, low = packed, n + 1
        else:
            high = n - 1
    return best


class Caller:
    """Sequential requests on one keep-alive connection, reconnecting when
    the server closed it (as it may after refusing an unread body)."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, int]:
        """(status, answer bytes); (0, 0) when no answer came (a timeout)."""
        while True:
            kept = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                reply = self.conn.getresponse()
                data = reply.read()
                if reply.getheader("connection", "").lower() == "close":
                    self.close()
                return reply.status, len(data)
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                # Once more only when a kept connection turned out closed; a
                # timeout or a new connection failing is no answer.
                if not kept or isinstance(exc, TimeoutError):
                    return 0, 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def refused_cpu(pid: int, port: int, n: int, bomb_body: bytes) -> list[dict]:
    small_track = json.dumps([{"event": "e", "properties": {"distinct_id": "u"}}]).encode()
    small_client = b'[{"name":"e","anonymous_id":"a"}]'
    small_inslytic = json.dumps({"events": [{"eventName": "e", "timestamp": "2026-02-16T10:30:00.000Z",
                                             "anonymousId": "a", "sessionId": "s",
                                             "consentGiven": True}]}).encode()
    gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    plain = {"Content-Type": "application/json"}
    over = {"X-Cohorly-Token": "tok_bench", "X-Forwarded-For": "10.9.0.1"}
    client_bad = {"Authorization": "Bearer pk_wrong"}
    inslytic_bad = {"Authorization": "Bearer ins_wrong"}
    cases = [
        ("429 cohorly /track, small body", "/track", small_track, {**plain, **over}),
        ("429 cohorly /track, gzip bomb", "/track", bomb_body, {**gz, **over}),
        ("401 client /api/client/events, small", "/api/client/events", small_client, {**plain, **client_bad}),
        ("401 client /api/client/events, gzip bomb", "/api/client/events", bomb_body, {**gz, **client_bad}),
        ("401 inslytic /v1/ingest, small", "/v1/ingest", small_inslytic, {**plain, **inslytic_bad}),
        ("401 inslytic /v1/ingest, gzip bomb", "/v1/ingest", bomb_body, {**gz, **inslytic_bad}),
    ]
    caller = Caller(port)
    caller.request("POST", "/track", small_track, {**plain, **over})  # uses up the client's one admission
    rows = []
    for name, path, body, headers in cases:
        for _ in range(5):  # warm-up
            caller.request("POST", path, body, headers)
        statuses: dict[int, int] = {}
        before, started = cpu_seconds(pid), time.perf_counter()
        for _ in range(n):
            status, _ = caller.request("POST", path, body, headers)
            statuses[status] = statuses.get(status, 0) + 1
        wall = time.perf_counter() - started
        cpu = cpu_seconds(pid) - before
        rows.append({"scenario": name, "figure": f"{cpu / n * 1000:.2f} ms CPU/request",
                     "aim": AIMS["cpu"], "detail": f"body {len(body)} B; {n} requests in {wall:.2f} s; "
                                                   f"statuses {statuses}"})
    caller.close()
    return rows


async def slow_uploads(pid: int, port: int, connections: int, declared: int, chunk: int,
                       pause: float) -> dict:
    """`connections` keyless uploads to /v1/ingest, each declaring `declared`
    bytes and sending `chunk` bytes every `pause` seconds."""
    baseline = rss_mb(pid)
    peak = baseline
    statuses: dict[str, int] = {}
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)

    async def upload() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            return
        head = (f"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n").encode()
        outcome = "sent whole, no answer"
        try:
            writer.write(head)
            body = b"[" + b" " * (chunk - 1)
            sent = 0
            while sent < declared:
                part = body[: min(chunk, declared - sent)]
                writer.write(part)
                await writer.drain()
                sent += len(part)
                body = b" " * chunk
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]  # answered early
                    break
                await asyncio.sleep(pause)
            line = await asyncio.wait_for(reader.readline(), timeout=60)
            outcome = line.decode(errors="replace").split(" ", 2)[1] if line else "closed"
        except (TimeoutError, OSError, IndexError) as exc:
            outcome = type(exc).__name__
        finally:
            writer.close()
        statuses[outcome] = statuses.get(outcome, 0) + 1

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    await asyncio.gather(*[upload() for _ in range(connections)])
    wall = time.perf_counter() - started
    done.set()
    await sampler
    return {"scenario": f"peak RSS growth, {connections} keyless {declared // 2**20} MB uploads",
            "figure": f"{peak - baseline:.0f} MB", "aim": AIMS["rss"],
            "detail": f"RSS {baseline:.0f} -> peak {peak:.0f} MB; {wall:.1f} s; answers {statuses}"}


def healthz_during(port: int, name: str, heavy: tuple[str, bytes, dict[str, str]], timeout: float) -> dict:
    """/healthz latencies, one poll every ~10 ms on its own connection, from
    just before the heavy request starts until just after it ends."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        caller = Caller(port, timeout=timeout + 30)
        while not stop.is_set():
            started = time.perf_counter()
            caller.request("GET", "/healthz", None, {})
            latencies.append(time.perf_counter() - started)
            time.sleep(max(0.0, 0.01 - (time.perf_counter() - started)))
        caller.close()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.3)
    path, body, headers = heavy
    caller = Caller(port, timeout=timeout)
    started = time.perf_counter()
    status, size = caller.request("POST", path, body, headers)
    took = time.perf_counter() - started
    caller.close()
    time.sleep(0.3)
    stop.set()
    poller.join(timeout=timeout + 30)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")
    answer = f"{status}" if status else f"no answer within {timeout:.0f} s"
    return {"scenario": f"/healthz during {name}", "figure": f"max {max(ordered, default=0) * 1000:.0f} ms, "
                                                            f"p99 {p99 * 1000:.0f} ms",
            "aim": AIMS["healthz"],
            "detail": f"body {len(body)} B -> {answer}, {size} B answer in {took:.2f} s; {len(ordered)} polls"}


def engage_union(limit_bytes: int) -> bytes:
    head = b'{"token":"tok_bench","distinct_id":"hostile-union","$union":{"list":['
    numbers, size, n = [], len(head) + 3, 0
    while True:
        text = str(n).encode()
        if size + len(text) + 1 > limit_bytes:
            break
        numbers.append(text)
        size += len(text) + 1
        n += 1
    return head + b",".join(numbers) + b"]}}"


def valid_client_batch(n: int) -> bytes:
    events = [{"name": "Product Purchased", "anonymous_id": f"anon-{i % 50}",
               "data": {"product_id": i, "price": 49.99, "insert": uuid.uuid4().hex}} for i in range(n)]
    return json.dumps(events).encode()


def report(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    width = max(len(r["scenario"]) for r in rows)
    fig = max(len(r["figure"]) for r in rows)
    print(f"{'scenario'.ljust(width)}  {'figure'.ljust(fig)}  {'aim':9}  detail")
    for r in rows:
        print(f"{r['scenario'].ljust(width)}  {r['figure'].ljust(fig)}  {r['aim']:9}  {r['detail']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", action="store_true", help="PostgreSQL + Redis instead of SQLite")
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=200, help="refused requests per CPU case")
    parser.add_argument("--bomb-kb", type=int, default=1)
    parser.add_argument("--uploads", type=int, default=60)
    parser.add_argument("--union-bytes", type=int, default=1_048_000)
    parser.add_argument("--heavy-timeout", type=float, default=300.0, help="seconds a heavy request may take")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cpu,rss,healthz,engage")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    work = Path(tempfile.mkdtemp(prefix="dialgate-hostile-"))
    database = ""
    if args.pg:
        import asyncpg

        database = f"dialgate_hostile_{NONCE}"

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(args.pg_dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(admin(f'CREATE DATABASE "{database}"'))
        base = args.pg_dsn.rsplit("/", 1)[0].removeprefix("postgresql://")
        storage, redis_url = f"postgresql+asyncpg://{base}/{database}", args.redis_url
    else:
        storage, redis_url = f"sqlite+aiosqlite:///{work}/hostile.db", ""
    port = free_port()
    cfg = work / "hostile.toml"
    config(cfg, port, storage, redis_url)
    proc = Process([PY, "-m", "gateway.cli", "serve", "--config", str(cfg)], port, work / "gateway.log")
    pid = proc.proc.pid  # one worker: the serving process itself
    bomb_body = bomb(args.bomb_kb)
    inflated = len(gzip.decompress(bomb_body))
    rows: list[dict] = []
    try:
        if "cpu" not in skip:
            rows += refused_cpu(pid, port, args.requests, bomb_body)
        if "rss" not in skip:
            rows.append(asyncio.run(slow_uploads(pid, port, args.uploads, 5 * 2**20, 65536, 0.05)))
        if "healthz" not in skip:
            key = {"Authorization": "Bearer pk_bench", "Content-Type": "application/json"}
            rows.append(healthz_during(port, "client [{},{},...] gzip",
                                       ("/api/client/events", bomb_body, {**key, "Content-Encoding": "gzip"}),
                                       args.heavy_timeout))
            valid = ("/api/client/events", valid_client_batch(1000), key)
            rows.append(healthz_during(port, "client 1,000 valid events", valid, args.heavy_timeout))
        if "engage" not in skip:
            body = engage_union(args.union_bytes)
            headers = {"Content-Type": "application/json", "X-Forwarded-For": "10.9.0.2"}
            rows.append(healthz_during(port, f"/engage $union of {body.count(b',') + 1} numbers",
                                       ("/engage", body, headers), args.heavy_timeout))
    finally:
        proc.stop()
        if args.pg:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    backend = "PostgreSQL + Redis" if args.pg else "SQLite, in-process limits"
    report(rows, f"Hostile callers, one worker, {backend}; gzip bomb {len(bomb_body)} B -> {inflated} B "
                 f"({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)")
    print(f"\ngateway log: {work / 'gateway.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
