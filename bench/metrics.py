"""What the metrics cost a request: gateway.metrics's request-path calls,
timed in one process (in-memory values) and as a worker of several
(prometheus_client's multiprocess mode, values in memory-mapped files).

    .venv/bin/python bench/metrics.py [--n 200000]

Prints CPU microseconds per call for one increment, an accepted request
(events received and stored, and its duration) and a rejected one (its
rejection and its duration).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(n: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from gateway.metrics import Metrics

    metrics = Metrics()
    timer = metrics.timer("cohorly", "track")
    counter = metrics.rejections.labels("cohorly", "unauthorized")

    def accepted() -> None:
        metrics.events("cohorly", "shop", 1, 1)
        timer.observe(0.0031)

    def rejected() -> None:
        metrics.rejection("cohorly", "unauthorized")
        timer.observe(0.0004)

    def timed(call: Callable[[], None]) -> float:
        call()  # label children bound before the clock starts
        # CPU time, not wall time: on a busy machine the wait for a core
        # is not the metrics' cost.
        started = time.process_time()
        for _ in range(n):
            call()
        return (time.process_time() - started) / n * 1e6

    return {"increment": timed(counter.inc), "accepted request": timed(accepted),
            "rejected request": timed(rejected)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.n)))
        return 0
    directory = tempfile.mkdtemp(prefix="dialgate-bench-metrics-")
    try:
        base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        print(f"{'us per call':<20} {'one process':>12} {'multiprocess':>13}")
        results = []
        for env in (base, {**base, "PROMETHEUS_MULTIPROC_DIR": directory}):
            out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out))
        for name in results[0]:
            print(f"{name:<20} {results[0][name]:>12.2f} {results[1][name]:>13.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
