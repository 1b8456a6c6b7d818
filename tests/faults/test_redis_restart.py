"""Redis killed and restarted under load: the gateway keeps acknowledging,
duplicates stay single, and Redis is used again once it is back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.faults.harness import (
    Gateway,
    Load,
    batch_ids,
    figures,
    resend,
    stored_counts,
    wait_ready,
)
from tests.support import OwnRedis


def test_redis_kill_and_restart_under_load(tmp_path: Path, postgres_backend) -> None:
    b = postgres_backend
    redis_server = OwnRedis()
    redis_server.start()
    gw = Gateway(tmp_path, "gw", b["storage_url"], redis_server.url, b["redis_prefix"])
    # /readyz reports a Redis failure for redis.failure_window seconds (10 by
    # default): 1 here, so "200 after restart" measures the restart.
    text = gw.config.read_text().replace("retry_interval = 0.2", "retry_interval = 0.2\nfailure_window = 1.0")
    gw.config.write_text(text)
    load = Load(url_of=lambda: gw.url, threads=4, size=20)
    try:
        gw.start()
        assert httpx.get(gw.url + "/readyz", timeout=5).status_code == 200
        load.start()
        load.wait_for(20)

        redis_server.kill()
        down_after = wait_ready(gw.url, 503)
        marks = {"outage": len(load.results)}
        time.sleep(1.0)  # load keeps running without Redis
        # An SDK re-sending batches that were already acknowledged, during the outage.
        dup_during = resend(gw.url, load.acked()[:20], 20, attempts=1)

        redis_server.start()  # same port, empty
        up_after = wait_ready(gw.url, 200)
        marks["restart"] = len(load.results)
        time.sleep(1.0)
        load.stop()
        dup_after = resend(gw.url, load.acked()[-100:], 20, attempts=1)
        import redis

        client = redis.Redis.from_url(redis_server.url)
        keys_after = sum(1 for _ in client.scan_iter(match=b["redis_prefix"] + ":*", count=1000))
        client.close()

        outcomes = load.all_outcomes() + list(dup_during.values()) + list(dup_after.values())
        non_2xx = [o for o in outcomes if o.status != 200]
        acked = load.acked()
        expected = [i for p in load.results for i in batch_ids(p, 20)]
        counts = stored_counts(b["storage_url"], load.tag + "-%")
        result = figures("redis restart", expected, [i for p in acked for i in batch_ids(p, 20)], counts)
        resent = list(dup_during.values()) + list(dup_after.values())
        redundant = [json.loads(o.body).get("inserted") for o in resent]
        print(f"[redis restart] batches={len(load.results)} (outage began at #{marks['outage']}, "
              f"redis back at #{marks['restart']}) outcomes={load.summary()} "
              f"re-sent during outage={len(dup_during)} after={len(dup_after)} "
              f"inserted by re-sends={sum(redundant)} keys in the restarted redis={keys_after} "
              f"readyz 503 after {down_after:.2f}s, 200 after restart in {up_after:.2f}s")
        assert not non_2xx, f"{len(non_2xx)} refused: {non_2xx[:3]} {result}"
        assert (result["missing"], result["duplicates"], result["unexpected"]) == (0, 0, 0), result
        assert sum(redundant) == 0, redundant
        assert keys_after > 0, "the gateway did not use Redis again after its restart"
        assert marks["restart"] - marks["outage"] > 0 and len(load.results) - marks["restart"] > 0
    finally:
        load.stop()
        gw.stop()
        redis_server.kill()
    assert "Traceback" not in gw.stderr(), gw.stderr()[-3000:]
