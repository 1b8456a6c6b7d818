"""CPU microseconds of one rejected `/track` (an unknown token) through the
gateway's app called directly, no server or client in the way: the
pipeline, the rejection's log line and its metrics. CPU time, so the figure
holds on a busy machine where bench/run.py's rates do not.

    .venv/bin/python bench/reject_cpu.py [--format text|json] [--multiprocess] [--n 10000]

Logging is set up as `dialgate serve` sets it up, its stderr sent to
/dev/null; `--multiprocess` keeps the metrics as a worker of several does
(prometheus_client's multiprocess mode, in a directory of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"event":"Signed Up","properties":{"distinct_id":"u","$insert_id":"x","plan":"pro"}}'


async def measure(log_format: str, n: int) -> float:
    sys.path.insert(0, str(ROOT))
    from gateway import logs
    from gateway.app import build_app
    from gateway.config import from_dict

    work = tempfile.mkdtemp(prefix="dialgate-bench-reject-")
    settings = from_dict({
        "storage": {"url": f"sqlite+aiosqlite:///{work}/bench.db"},
        "logging": {"format": log_format},
        # No window in the way: every request is refused for its token.
        "dialects": {"cohorly": {"rate_limit": {"requests": 10**9, "per_seconds": 1}}},
        "projects": [{"name": "bench", "cohorly_tokens": ["tok_bench"]}],
    })
    logs.configure(settings.logging.format, settings.logging.level)
    app = build_app(settings)
    scope = {"type": "http", "method": "POST", "path": "/track", "raw_path": b"/track", "query_string": b"",
             "headers": [(b"x-cohorly-token", b"not-a-token"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(BODY)).encode())],
             "client": ("10.0.0.1", 5000), "server": ("127.0.0.1", 8000), "scheme": "http",
             "http_version": "1.1", "asgi": {"version": "3.0"}}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        for _ in range(2000):  # warm: label children bound, caches filled
            await app(scope, receive, send)
        assert statuses[-1] == 401, statuses[-1]
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(n):
                await app(scope, receive, send)
            best = min(best, (time.process_time() - started) / n * 1e6)
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await life
        shutil.rmtree(work, ignore_errors=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{asyncio.run(measure(args.format, args.n)):.1f}")
        return 0
    # A process of its own: prometheus_client picks its mode at import, and
    # the log lines go to /dev/null.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    directory = tempfile.mkdtemp(prefix="dialgate-bench-metrics-") if args.multiprocess else None
    if directory:
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--format", args.format, "--n", str(args.n)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    mode = "multiprocess metrics" if args.multiprocess else "one process"
    print(f"rejected /track, {args.format} logs, {mode}: {out.stdout.strip()} us CPU a request (best of 5 x {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
