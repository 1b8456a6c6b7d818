"""SIGTERM with requests in flight: the gateway drains and exits 0 within its
graceful timeout; every request sent before the signal is answered 2xx and
stored (the drain phase keeps serving until the gateway goes quiet)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from tests.faults.harness import Gateway, Outcome, batch_ids, figures, post_batch, stored_counts

BATCHES, SIZE, GRACEFUL = 30, 200, 10


def test_sigterm_drains_in_flight_requests(tmp_path: Path, postgres_backend) -> None:
    b = postgres_backend
    gw = Gateway(tmp_path, "gw", b["storage_url"], b["redis_url"], b["redis_prefix"])
    tag = f"term{time.monotonic_ns()}"
    prefixes = [f"{tag}-b{n}" for n in range(BATCHES)]

    # Connections opened (keep-alive) before the load, so the 30 batches are
    # really in flight together rather than still connecting at the signal.
    clients = {p: httpx.Client() for p in prefixes}
    barrier = threading.Barrier(BATCHES)

    def send(prefix: str) -> Outcome:
        barrier.wait(timeout=10)
        return post_batch(clients[prefix], gw.url, prefix, SIZE, timeout=GRACEFUL + 5)

    outcomes: dict[str, Outcome] = {}
    exit_code, took = None, None
    try:
        gw.start()
        assert gw.process is not None
        for client in clients.values():
            assert client.get(gw.url + "/healthz").status_code == 200
        with ThreadPoolExecutor(max_workers=BATCHES) as pool:
            futures = {pool.submit(send, p): p for p in prefixes}
            in_flight_at_signal = None
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                if in_flight_at_signal is None:
                    in_flight_at_signal = sum(1 for f in futures if not f.done())
                    started = time.monotonic()
                    gw.process.send_signal(signal.SIGTERM)
            try:
                exit_code = gw.process.wait(timeout=GRACEFUL + 3)
                took = time.monotonic() - started
            except subprocess.TimeoutExpired:
                pass
    finally:
        gw.stop()
        for client in clients.values():
            client.close()

    acked = [p for p, o in outcomes.items() if o.status is not None and 200 <= o.status < 300]
    acked_ids = [i for p in acked for i in batch_ids(p, SIZE)]
    counts = stored_counts(b["storage_url"], tag + "-%")
    tally: dict[str, int] = {}
    for o in outcomes.values():
        key = str(o.status) if o.status is not None else o.error
        tally[key] = tally.get(key, 0) + 1
    result = figures("SIGTERM", acked_ids, acked_ids, counts)
    print(f"[SIGTERM] in flight at signal={in_flight_at_signal} outcomes={tally} exit={exit_code} "
          f"exit after {took if took is None else round(took, 2)}s")
    assert exit_code == 0, (exit_code, gw.stderr()[-2000:])
    assert took is not None and took < GRACEFUL + 1, took
    assert result["acked_missing"] == 0 and result["duplicates"] == 0, result
    # Every batch was sent before the signal: the drain answers each of them.
    assert len(acked) == BATCHES, tally
    # Refusals must be clean: a 503 at most, never a 4xx or a 500.
    bad = {p: o for p, o in outcomes.items()
           if o.status is not None and not (200 <= o.status < 300 or o.status in (502, 503))}
    assert not bad, list(bad.items())[:3]
    # A request not acknowledged may have committed, but only whole batches, never a 2xx without data.
    for p in prefixes:
        stored = sum(1 for i in batch_ids(p, SIZE) if i in counts)
        assert stored in (0, SIZE), (p, stored)
    assert "Traceback" not in gw.stderr(), gw.stderr()[-3000:]
