"""Dialgate benchmark: one command, one table.

    .venv/bin/python bench/run.py              # everything, with a 5-minute soak
    .venv/bin/python bench/run.py --quick      # shorter runs, 60 s soak
    .venv/bin/python bench/run.py --only cohorly-single,http-ceiling

Needs wrk (Debian: `apt-get install wrk`), and PostgreSQL and Redis on
127.0.0.1 (the same servers the tests use; override with --pg-dsn and
--redis-url). Every gateway is a real `dialgate serve` process; wrk drives
it from another process; every request carries unique `$insert_id`s so
nothing is skipped as a duplicate. After each scenario the events acknowledged
with a 2xx are counted against the events stored.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NONCE = uuid.uuid4().hex[:8]

TS = "2026-02-16T10:30:00.000Z"


def cohorly_event(i: int) -> str:
    return ('{"event":"Signed Up","properties":{"distinct_id":"user-@ID@","time":1751600000000,'
            f'"$insert_id":"@ID@-{i}","$lib":"python","$lib_version":"0.2.0","plan":"pro","n":{i}}}}}')


def inslytic_event(i: int) -> str:
    return ('{"eventName":"page_viewed","timestamp":"' + TS + '","anonymousId":"anon-@ID@",'
            f'"sessionId":"s-@ID@","consentGiven":true,"properties":{{"path":"/p/{i}"}},'
            '"pageUrl":"https://example.com/p","deviceType":"desktop"}')


def client_event(i: int) -> str:
    return ('{"name":"Product Purchased","anonymous_id":"anon-@ID@","external_id":null,'
            f'"data":{{"product_id":{i},"price":49.99,"quantity":4}}}}')


def collect_event(i: int) -> str:
    return (f'{{"event_name":"page_view","title":"Home","user":{{"consistent_anonymous_id":"caid-@ID@"}},'
            f'"context":{{"event_id":"@ID@-{i}","event_timestamp":1751600000000,"page":{{"url":"https://x"}}}}}}')


# The browser SDK's wire format: a form field `data` holding the URL-encoded
# standard base64 of a JSON array. wrk cannot base64 a body per request
# cheaply, so every unique id in the JSON is a fixed-width placeholder
# starting on a 3-byte boundary: its base64 is then a run of its own, which
# the Lua script replaces with the base64 of the request's id (same width).
MP_ID = "@" * 33  # nonce (padded to 20) "-" thread (1) "-" counter (10 digits): 33 bytes
MP_ID_B64 = base64.b64encode(MP_ID.encode()).decode()


def mixpanel_browser_event(i: int) -> dict[str, object]:
    return {"event": "Viewed Item", "properties": {
        "$os": "Linux", "$browser": "Chrome", "$current_url": "https://shop.example/p/1",
        "$browser_version": 131, "$screen_height": 1080, "$screen_width": 1920,
        "mp_lib": "web", "$lib_version": "2.83.0", "time": 1751600000.123 + i,
        "distinct_id": MP_ID, "$device_id": "18f3c2a1-9b7e-4c1d-8e5f-2a6b7c8d9e0f",
        "$insert_id": f"{MP_ID}-{i}", "token": "mp_bench", "mp_sent_by_lib_version": "2.83.0",
        "item": i, "page": "home",
    }}


def mixpanel_browser_batch(n: int) -> str:
    """`data=<base64 JSON array of n events>` as mixpanel-browser sends it,
    each `MP_ID` placeholder aligned by JSON whitespace before its string."""
    text = "[" + ",".join(json.dumps(mixpanel_browser_event(i), separators=(",", ":")) for i in range(n)) + "]"
    parts = text.split(f'"{MP_ID}')
    out = parts[0]
    for part in parts[1:]:
        out += " " * ((3 - (len(out.encode()) + 1) % 3) % 3) + f'"{MP_ID}' + part
    encoded = base64.b64encode(out.encode()).decode()
    assert encoded.count(MP_ID_B64) == 2 * n
    return "data=" + encoded.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


@dataclass
class Scenario:
    name: str
    backend: str  # pg (PostgreSQL + Redis), sqlite, or noop
    path: str
    body: str
    events: int  # per request
    headers: dict[str, str] = field(default_factory=dict)
    connections: int = 32
    source: str = "cohorly"
    expect_2xx: bool = True
    # What its ratio is taken against: another scenario's name, or
    # "storage:postgres" / "storage:sqlite" (the storage ceilings).
    ref: str = ""
    # "base64": the body holds MP_ID placeholders in base64 (mixpanel_browser_batch)
    ids: str = "plain"


def scenarios() -> list[Scenario]:
    token = {"X-Cohorly-Token": "tok_bench", "Content-Type": "application/json"}
    batch = lambda n: "[" + ",".join(cohorly_event(i) for i in range(n)) + "]"  # noqa: E731
    return [
        Scenario("http-ceiling-single", "noop", "/track", cohorly_event(0), 1, token, 64),
        Scenario("http-ceiling-batch500", "noop", "/track", batch(500), 500, token, 8),
        Scenario("cohorly-single", "pg", "/track", cohorly_event(0), 1, token, 64, ref="http-ceiling-single"),
        Scenario("cohorly-batch50", "pg", "/track", batch(50), 50, token, 16),
        Scenario("cohorly-batch500", "pg", "/track", batch(500), 500, token, 16, ref="storage:postgres"),
        Scenario("cohorly-single-sqlite", "sqlite", "/track", cohorly_event(0), 1, token, 64,
                 ref="http-ceiling-single"),
        Scenario("cohorly-batch500-sqlite", "sqlite", "/track", batch(500), 500, token, 16, ref="storage:sqlite"),
        Scenario("inslytic-batch1000", "pg", "/v1/ingest",
                 '{"events":[' + ",".join(inslytic_event(i) for i in range(1000)) + "]}", 1000,
                 {"Authorization": "Bearer ins_bench", "Content-Type": "application/json"}, 8, "inslytic",
                 ref="cohorly-batch50"),
        Scenario("client-events50", "pg", "/api/client/events",
                 "[" + ",".join(client_event(i) for i in range(50)) + "]", 50,
                 {"Authorization": "Bearer pk_bench", "Content-Type": "application/json"}, 16, "client",
                 ref="cohorly-batch50"),
        Scenario("collect-batch100", "pg", "/events/batch?tc_s=4242&token=src_bench",
                 '{"batch":[' + ",".join(collect_event(i) for i in range(100)) + "]}", 100,
                 {"Content-Type": "text/plain;charset=UTF-8"}, 16, "collect", ref="cohorly-batch50"),
        Scenario("mixpanel-browser-batch50", "pg", f"/track/?verbose=1&ip=1&_={1751600000000}",
                 mixpanel_browser_batch(50), 50, {"Content-Type": "application/x-www-form-urlencoded"}, 16,
                 "mixpanel", ref="cohorly-batch50", ids="base64"),
        Scenario("reject-bad-token", "pg", "/track", cohorly_event(0), 0,
                 {"X-Cohorly-Token": "not-a-token", "Content-Type": "application/json"}, 64, expect_2xx=False,
                 ref="http-ceiling-single"),
    ]


# The targets of the benchmark issue: scenario -> (label, least ratio to its ref).
TARGETS = {
    "cohorly-batch500": ("batch-500 PG / PG storage ceiling", 0.8),
    "cohorly-batch500-sqlite": ("batch-500 SQLite / SQLite ceiling", 0.5),
    "cohorly-single": ("single /track (PG + Redis) / HTTP ceiling", 0.6),
    "cohorly-single-sqlite": ("single /track (SQLite default) / HTTP ceiling", 0.6),
    "reject-bad-token": ("reject path / HTTP ceiling", 0.8),
    "inslytic-batch1000": ("inslytic-batch1000 / cohorly-batch50 events/s", 0.8),
    "client-events50": ("client-events50 / cohorly-batch50 events/s", 0.8),
    "collect-batch100": ("collect-batch100 / cohorly-batch50 events/s", 0.8),
    "mixpanel-browser-batch50": ("mixpanel browser batch-50 (form, base64) / cohorly-batch50 events/s", 0.8),
}


def combine(results: list[dict]) -> dict:
    """Rounds of one scenario as one run: counts summed, the median p50 and
    the largest p99 of the rounds."""
    total = {k: sum(r[k] for r in results) for k in ("requests", "ok", "non2xx", "seconds", "errors")}
    total["p50"] = statistics.median(r["p50"] for r in results)
    total["p99"] = max(r["p99"] for r in results)
    total["rps"] = total["requests"] / total["seconds"]
    return total


LUA = r"""
local template = [==[%(body)s]==]
local path = [==[%(path)s]==]
local headers = %(headers)s
local nonce = "%(nonce)s"
local pace = %(pace)s
local ids = "%(ids)s"
local placeholder = "%(placeholder)s"
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local ESCAPE = {["+"] = "%%2B", ["/"] = "%%2F", ["="] = "%%3D"}
-- Standard base64 of a string whose length is a multiple of 3, URL-encoded.
local function b64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + b * 256 + c
    for shift = 18, 0, -6 do
      local k = math.floor(n / 2 ^ shift) %% 64 + 1
      out[#out + 1] = B64:sub(k, k)
    end
  end
  return (table.concat(out):gsub("[+/=]", ESCAPE))
end
counter = 0
ok = 0
non2xx = 0
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  math.randomseed(os.time() * 100 + tid)
end
request = function()
  counter = counter + 1
  local body
  if ids == "base64" then
    local padded = nonce .. string.rep("x", 20 - #nonce)
    body = template:gsub(placeholder, b64(string.format("%%s-%%d-%%010d", padded, tid, counter)))
  else
    body = template:gsub("@ID@", nonce .. "-" .. tid .. "-" .. counter)
  end
  return wrk.format("POST", path, headers, body)
end
response = function(status, hdrs, body)
  if status >= 200 and status < 300 then ok = ok + 1 else non2xx = non2xx + 1 end
end
if pace > 0 then
  -- Uniform on [0, 2 * pace]: the connections drift apart instead of
  -- sending in lock-step bursts, as independent SDK clients do.
  delay = function() return math.random(0, 2 * pace) end
end
done = function(summary, latency, requests)
  local total_ok, total_bad = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_bad = total_bad + t:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%%d,"ok":%%d,"non2xx":%%d,"p50":%%.3f,"p99":%%.3f,'
    .. '"seconds":%%.3f,"errors":%%d}\n',
    summary.requests, total_ok, total_bad, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.duration / 1e6, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk(url: str, scenario: Scenario, seconds: float, nonce: str, pace_ms: int = 0,
        connections: int | None = None) -> dict:
    headers = "{" + ",".join(f'["{k}"]="{v}"' for k, v in scenario.headers.items()) + "}"
    script = LUA % {"body": scenario.body, "path": scenario.path, "headers": headers,
                    "ids": scenario.ids, "placeholder": MP_ID_B64,
                    "nonce": nonce, "pace": pace_ms}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    conns = connections or scenario.connections
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", f.name, url],
        capture_output=True, text=True, check=True,
    ).stdout
    os.unlink(f.name)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["rps"] = result["requests"] / result["seconds"]
    return result


class Process:
    """A server process (and its workers), with peak RSS from /proc."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port = port
        # A file, not a pipe: nobody reads a pipe while wrk runs, and a full
        # one would stall the server on its next log line.
        self.log = log
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text()[-2000:]) from None
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def pids(self) -> list[int]:
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    todo += [int(c) for c in children]
            except OSError:
                pass
        return found

    def memory(self, key: str = "VmHWM") -> float:
        """Largest per-process value among the server's processes, in MB."""
        best = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        best = max(best, int(line.split()[1]))
            except OSError:
                pass
        return best / 1024

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(path: Path, port: int, storage: str, redis_url: str, workers: int) -> None:
    path.write_text(f"""
[server]
bind = "127.0.0.1:{port}"
workers = {workers}
[storage]
url = "{storage}"
[redis]
url = "{redis_url}"
key_prefix = "dialgate-bench-{NONCE}"
[admin]
keys = ["adm_bench"]
[[projects]]
name = "bench"
cohorly_tokens = ["tok_bench"]
mixpanel_tokens = ["mp_bench"]
client_keys = ["pk_bench"]
inslytic_keys = ["ins_bench"]
collect_sources = [{{ site = 4242, token = "src_bench" }}]
inslytic_events_per_minute = 1000000000
[dialects.cohorly]
rate_limit = {{ requests = 1000000000, per_seconds = 1 }}
""")


async def pg_admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def pg_count(dsn: str, source: str, nonce: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM events WHERE project = 'bench' AND source = $1 AND received_at >= $2",
            source, int(nonce))
    finally:
        await conn.close()


def sqlite_count(path: str, source: str, nonce: str) -> int:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM events WHERE project = 'bench' AND source = ? AND received_at >= ?",
                          (source, int(nonce))).fetchone()[0]
    finally:
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="5 s per scenario, 60 s soak")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--soak", type=float, default=None, help="soak length in seconds (0: none; default 300)")
    # One worker per core, as a deployment would run it (the HTTP ceiling
    # runs with the same count).
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3,
                        help="a compared scenario runs in this many rounds, each right after a fresh measurement "
                             "of what it is compared to; its ratio is the median of the rounds'")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 5
    if args.soak is None:
        args.soak = 60 if args.quick else 300
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian's package)", file=sys.stderr)
        return 2
    only = set(filter(None, args.only.split(",")))
    chosen = [s for s in scenarios() if not only or s.name in only]
    work = Path(tempfile.mkdtemp(prefix="dialgate-bench-"))
    base = args.pg_dsn.rpartition("/")[0]
    bench_dsn = f"{base}/dialgate_bench"
    asyncio.run(pg_admin(args.pg_dsn, "DROP DATABASE IF EXISTS dialgate_bench WITH (FORCE)"))
    asyncio.run(pg_admin(args.pg_dsn, "CREATE DATABASE dialgate_bench"))
    pg_url = "postgresql+asyncpg://" + bench_dsn.removeprefix("postgresql://")
    sqlite_path = work / "bench.db"
    servers: dict[str, Process] = {}
    rows: list[dict] = []

    def server(kind: str) -> Process:
        if kind not in servers:
            port = free_port()
            if kind == "noop":
                # The gateway's own server stack (gateway.serve), with nothing behind it.
                servers[kind] = Process([PY, "-m", "gateway.serve", "bench.noop:app", "--bind", f"127.0.0.1:{port}",
                                         "--workers", str(args.workers)], port, work / "noop.log")
            else:
                config = work / f"{kind}.toml"
                storage = pg_url if kind == "pg" else f"sqlite+aiosqlite:///{sqlite_path}"
                gateway_config(config, port, storage, args.redis_url if kind == "pg" else "", args.workers)
                servers[kind] = Process([PY, "-m", "gateway.cli", "serve", "--config", str(config)], port,
                                        work / f"{kind}.log")
        return servers[kind]

    def count(kind: str, source: str, since: str) -> int:
        if kind == "pg":
            return asyncio.run(pg_count(bench_dsn, source, since))
        return sqlite_count(str(sqlite_path), source, since)

    def storage_ceiling(kind: str, seconds: float) -> float:
        target = bench_dsn if kind == "postgres" else str(work / "ceiling.db")
        out = subprocess.run([PY, str(ROOT / "bench" / "ceiling.py"), kind, target, str(seconds)],
                             capture_output=True, text=True, check=True).stdout
        return float(json.loads(out)["events_per_s"])

    refs_run = 0

    def reference(ref: str, seconds: float) -> float:
        """A fresh measurement of what a scenario is compared to."""
        nonlocal refs_run
        if ref.startswith("storage:"):
            return storage_ceiling(ref.removeprefix("storage:"), seconds)
        other = next(s for s in scenarios() if s.name == ref)
        refs_run += 1
        result = wrk(f"http://127.0.0.1:{server(other.backend).port}", other, seconds, f"ref{NONCE}{refs_run}")
        return result["rps"] if other.backend == "noop" else result["ok"] * other.events / result["seconds"]

    ceilings: dict[str, float] = {}
    try:
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cores, workers={args.workers}, "
              f"{args.seconds:.0f} s per scenario", flush=True)
        if not only or "storage-ceiling" in only:
            for kind in ("postgres", "sqlite"):
                ceilings[kind] = storage_ceiling(kind, min(args.seconds, 10))
                print(f"# storage ceiling {kind}: {ceilings[kind]:,.0f} events/s", flush=True)
        for scenario in chosen:
            proc = server(scenario.backend)
            url = f"http://127.0.0.1:{proc.port}"
            wrk(url, scenario, 2, "warm" + NONCE)  # warm-up, not counted
            since = str(int(time.time() * 1000))
            nonce = f"{NONCE}{len(rows)}"
            # Compared scenarios alternate with what they are compared to, so
            # the ratio is of two measurements seconds apart (the machine's
            # speed drifts by tens of percent over minutes).
            rounds = max(1, args.rounds) if scenario.ref else 1
            results, refs = [], []
            for r in range(rounds):
                if scenario.ref:
                    refs.append(reference(scenario.ref, args.seconds / rounds))
                results.append(wrk(url, scenario, args.seconds / rounds, f"{nonce}r{r}"))
            result = combine(results)
            row = {"scenario": scenario.name, "backend": scenario.backend, **result,
                   "eps": result["ok"] * scenario.events / result["seconds"], "rss": proc.memory()}
            if scenario.ref:
                mine = [(x["rps"] if scenario.ref.startswith("http-") else x["ok"] * scenario.events / x["seconds"])
                        for x in results]
                row["ratio"] = statistics.median(m / ref for m, ref in zip(mine, refs, strict=True))
                row["refs"] = refs
            if scenario.backend != "noop":
                time.sleep(1)  # let in-flight requests at wrk's cut-off finish
                stored = count(scenario.backend, scenario.source, since)
                acked = result["ok"] * scenario.events
                row.update(acked=acked, stored=stored, missing=max(0, acked - stored))
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            if scenario.name == "cohorly-single":
                # p99 at half the maximum rate, paced by wrk's delay() per
                # connection: a short run measures the latency at that pace,
                # the pace is corrected for it, then the measured run.
                half = row["rps"] / 2
                conns = 16
                pace = max(1, int(conns * 1000 / half))
                probe = wrk(url, scenario, 3, nonce + "q", pace_ms=pace, connections=conns)
                latency_ms = conns * 1000 / probe["rps"] - pace
                pace = max(1, int(conns * 1000 / half - latency_ms))
                paced = wrk(url, scenario, args.seconds, nonce + "p", pace_ms=pace, connections=conns)
                paced_row = {"scenario": "cohorly-single@half", "backend": "pg", **paced,
                             "eps": paced["ok"] / paced["seconds"], "rss": proc.memory()}
                rows.append(paced_row)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in paced_row.items()}
                print(json.dumps(shown), flush=True)
        if args.soak and (not only or "soak" in only):
            proc = server("pg")
            scenario = next(s for s in scenarios() if s.name == "cohorly-batch500")
            url = f"http://127.0.0.1:{proc.port}"
            since = str(int(time.time() * 1000))
            samples: list[float] = []
            minute = min(60.0, args.soak / 5)
            runner = subprocess.Popen([PY, "-c", "import sys, json; sys.path.insert(0, 'bench'); import run; "
                                       f"print(json.dumps(run.soak_wrk({url!r}, {args.soak})))"],
                                      cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for i in range(5):
                time.sleep(minute if i < 4 else max(0.0, args.soak - 4 * minute - 1))
                samples.append(proc.memory("VmRSS"))
            result = json.loads(runner.communicate()[0].strip().splitlines()[-1])
            time.sleep(1)
            stored = count("pg", "cohorly", since)
            acked = result["ok"] * scenario.events
            row = {"scenario": f"soak-batch500-{args.soak:.0f}s", "backend": "pg", **result,
                   "eps": acked / result["seconds"], "rss": proc.memory(), "acked": acked, "stored": stored,
                   "missing": max(0, acked - stored), "rss_first": samples[0], "rss_last": samples[-1]}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    finally:
        for proc in servers.values():
            proc.stop()
        asyncio.run(pg_admin(args.pg_dsn, "DROP DATABASE IF EXISTS dialgate_bench WITH (FORCE)"))
        shutil.rmtree(work, ignore_errors=True)
        forget_redis_keys(args.redis_url)
    report(rows, ceilings)
    return 0


def forget_redis_keys(url: str) -> None:
    """The run's dedup and limit keys would otherwise live for a day
    (unlinked: freeing a dedup set of millions of ids would stall Redis)."""
    import redis

    client = redis.Redis.from_url(url)
    batch = []
    for key in client.scan_iter(match=f"dialgate-bench-{NONCE}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)
    client.close()


def soak_wrk(url: str, seconds: float) -> dict:
    scenario = next(s for s in scenarios() if s.name == "cohorly-batch500")
    return wrk(url, scenario, seconds, "soak" + NONCE)


def report(rows: list[dict], ceilings: dict[str, float]) -> None:
    print()
    print(f"| {'scenario':<26} | {'backend':<7} | {'req/s':>8} | {'events/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} "
          f"| {'non-2xx':>7} | {'RSS MB':>6} | {'acked':>9} | {'stored':>9} | missing |")
    print("|" + "|".join("-" * w for w in (28, 9, 10, 11, 9, 9, 9, 8, 11, 11, 9)) + "|")
    for r in rows:
        print(f"| {r['scenario']:<26} | {r['backend']:<7} | {r['rps']:>8,.0f} | {r['eps']:>9,.0f} | {r['p50']:>7.1f} "
              f"| {r['p99']:>7.1f} | {r['non2xx']:>7} | {r['rss']:>6.0f} | {r.get('acked', '-'):>9} "
              f"| {r.get('stored', '-'):>9} | {r.get('missing', '-'):>7} |")
    by = {r["scenario"]: r for r in rows}
    print()
    if ceilings:
        print("storage ceilings at the start of the run: "
              + ", ".join(f"{kind} {rate:,.0f} events/s" for kind, rate in ceilings.items()))
    for name, (label, target) in TARGETS.items():
        row = by.get(name)
        if row is None or "ratio" not in row:
            continue
        ratio = row["ratio"]
        refs = ", ".join(f"{x:,.0f}" for x in row["refs"])
        print(f"{label:<48} {ratio:6.2f}  (target >= {target})  {'ok' if ratio >= target else 'BELOW TARGET'}"
              f"  [median of {len(row['refs'])} rounds; reference per round: {refs}]")
    if "cohorly-single@half" in by:
        p99 = by["cohorly-single@half"]["p99"]
        verdict = "ok" if p99 <= 25 else "BELOW TARGET"
        print(f"{'single /track p99 at half the max rate':<48} {p99:6.1f} ms (target <= 25)  {verdict}")
    rss = max((r["rss"] for r in rows if r["backend"] != "noop"), default=0)
    print(f"{'peak RSS per worker':<48} {rss:6.0f} MB (target <= 250)  {'ok' if rss <= 250 else 'BELOW TARGET'}")
    soak = next((r for r in rows if r["scenario"].startswith("soak")), None)
    if soak:
        growth = (soak["rss_last"] - soak["rss_first"]) / soak["rss_first"]
        print(f"{'soak RSS growth, first to fifth sample':<48} {growth * 100:5.1f} % (target <= 10 %)  "
              f"{'ok' if growth <= 0.10 else 'BELOW TARGET'}")
    missing = sum(r.get("missing", 0) for r in rows)
    verdict = "ok" if missing == 0 else "LOST DATA"
    print(f"{'acknowledged events missing, all scenarios':<48} {missing:6d}  (target 0)  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
