"""The end-to-end lag of bench/jetstream.py: publish acknowledgement ->
row visible in PostgreSQL, per batch-500 request, at a given rate."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection

import run
from run import NONCE


def batch500() -> run.Scenario:
    return next(s for s in run.scenarios() if s.name == "cohorly-batch500")


def lag_tag(nonce: str, n: int) -> str:
    return f"lag{nonce}-{n}"


def watch_visible(dsn: str, nonce: str, per_second: float, total: int, settle: float, pipe: Connection) -> None:
    """The poller, in a process of its own so that the sender's work never
    delays its clock. Once connected it says "ready" and is sent `start`:
    request n is due at start + n / per_second; the wall time its last event
    is first seen is sent back (after the sender has sent the acknowledged
    requests' numbers). `nonce`: the parent's (a spawned process draws its
    own)."""
    import asyncpg

    last = batch500().events - 1

    async def watch() -> dict[int, float]:
        conn = await asyncpg.connect(dsn)
        pipe.send("ready")
        start: float = pipe.recv()
        seen: dict[int, float] = {}
        unseen: set[int] = set()
        due = 0
        wanted: set[int] | None = None
        deadline = start + total / per_second + settle
        try:
            while time.time() < deadline:
                while due < total and start + due / per_second <= time.time():
                    unseen.add(due)
                    due += 1
                if wanted is None and pipe.poll():
                    wanted = pipe.recv()
                    unseen &= wanted
                if wanted is not None and not unseen and due >= total:
                    break
                if unseen:
                    ids = [f"{lag_tag(nonce, n)}-{last}" for n in unseen]
                    rows = await conn.fetch(
                        "SELECT insert_id FROM events WHERE project = 'bench' AND source = 'cohorly' "
                        "AND insert_id = ANY($1::varchar[])", ids)
                    now = time.time()
                    for r in rows:
                        n = int(r["insert_id"].split("-")[1])
                        seen[n] = now
                        unseen.discard(n)
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        return seen

    pipe.send(asyncio.run(watch()))


def lag(url: str, dsn: str, rate: float, seconds: float, settle: float = 30) -> dict:
    """Open-loop batch-500 requests at `rate` events/s for `seconds`; per
    request, acknowledgement -> its last event visible in PostgreSQL."""
    import httpx

    scenario = batch500()
    per_second = rate / scenario.events
    total = max(1, int(seconds * per_second))
    acked: dict[int, float] = {}
    failed = 0
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    poller = multiprocessing.get_context("spawn").Process(
        target=watch_visible, args=(dsn, NONCE, per_second, total, settle, theirs))
    poller.start()
    # Spawning and importing take seconds on a busy machine: start once it is up.
    if not ours.poll(120) or ours.recv() != "ready":
        poller.kill()
        raise RuntimeError("the lag poller did not start")
    start = time.time() + 0.1
    ours.send(start)

    async def send(client: httpx.AsyncClient, n: int) -> None:
        nonlocal failed
        body = scenario.body.replace("@ID@", lag_tag(NONCE, n))
        try:
            reply = await client.post(url + scenario.path, content=body, headers=scenario.headers)
        except httpx.HTTPError:
            failed += 1
            return
        if reply.status_code // 100 == 2:
            acked[n] = time.time()
        else:
            failed += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            tasks = []
            for n in range(total):
                await asyncio.sleep(max(0.0, start + n / per_second - time.time()))
                tasks.append(asyncio.create_task(send(client, n)))
            await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        ours.send(set(acked))
        seen: dict[int, float] = ours.recv()
    finally:
        poller.join(timeout=settle + 10)
        if poller.is_alive():
            poller.kill()
    lags = sorted(max(0.0, seen[n] - t) for n, t in acked.items() if n in seen)
    pick = (lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] if lags else float("nan"))  # noqa: E731
    return {"requests": total, "visible": len(lags), "never_visible": len(acked) - len(lags), "failed": failed,
            "p50": pick(0.50), "p99": pick(0.99), "max": lags[-1] if lags else float("nan")}
