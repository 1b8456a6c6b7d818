"""kill -9 of a `dialgate serve` process group under load: every batch
acknowledged before the kill is stored, and SDK-style re-sends of everything
(acknowledged or not) to a fresh gateway land exactly once."""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.harness import Gateway, Load, batch_ids, figures, resend, stored_counts


def test_kill9_under_load_loses_and_duplicates_nothing(tmp_path: Path, postgres_backend) -> None:
    b = postgres_backend
    first = Gateway(tmp_path, "first", b["storage_url"], b["redis_url"], b["redis_prefix"])
    second = Gateway(tmp_path, "second", b["storage_url"], b["redis_url"], b["redis_prefix"])
    load = Load(url_of=lambda: first.url, threads=6, size=20)
    try:
        first.start()
        load.start()
        load.wait_for(30)
        time.sleep(0.2)
        first.kill9()  # the whole process group, mid-load
        time.sleep(0.3)  # the clients see connection errors now
        load.stop()
        acked_before = load.acked()
        pending = load.not_acked()
        acked_ids = [i for p in acked_before for i in batch_ids(p, 20)]

        # What the kill left behind: every acknowledged event must be there.
        at_kill = stored_counts(b["storage_url"], load.tag + "-%")
        kill = figures("kill -9: before re-send", acked_ids, acked_ids, at_kill)
        print(f"[kill -9] batches acked={len(acked_before)} not acked={len(pending)} "
              f"outcomes={load.summary()}")
        assert kill["acked_missing"] == 0 and kill["duplicates"] == 0, kill

        second.start()
        final = resend(second.url, pending + acked_before, 20)
        refused = {p: o for p, o in final.items() if o.status != 200}
        assert not refused, f"re-sends not acknowledged: {list(refused.items())[:3]}"
        all_prefixes = pending + acked_before
        expected = [i for p in all_prefixes for i in batch_ids(p, 20)]
        after = stored_counts(b["storage_url"], load.tag + "-%")
        result = figures("kill -9: after re-send", expected, expected, after)
        assert (result["missing"], result["duplicates"], result["unexpected"]) == (0, 0, 0), result
        assert all(n == 1 for n in after.values())
    finally:
        load.stop()
        if first.process is not None and first.process.poll() is None:
            first.kill9()
        second.stop()
    assert "Traceback" not in second.stderr(), second.stderr()
