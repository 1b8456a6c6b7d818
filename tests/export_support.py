"""Helpers of the export tests: a database filled fast, a config file for
the CLI, and the CLI run in a process of its own with its peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from storage import tables
from storage.engine import create_engine
from storage.migrate import upgrade
from tests.support import ADMIN

ROOT = Path(__file__).resolve().parent.parent
BASE_TIME = 1_765_000_000_000


def bulk_event(i: int, project: str = "shop") -> dict[str, Any]:
    """Event `i`: every column used, nulls and the odd value spread over them."""
    return {
        "project": project, "source": ("cohorly", "client", "collect")[i % 3], "name": f"Event {i % 11}",
        "distinct_id": None if i % 97 == 0 else f"user-{i % 4000}", "anonymous_id": f"anon-{i % 5000}",
        "user_id": None if i % 2 else f"user-{i % 4000}", "time": BASE_TIME + i * 10,
        "received_at": BASE_TIME + i * 10 + 250, "insert_id": None if i % 13 == 0 else f"ins-{i}",
        "session_id": f"s-{i // 40}" if i % 5 else None,
        "properties": {"n": i, "price": i / 7, "plan": "pro", "emoji": "🎉 é \" \\ \n", "$lib": "x",
                       "tags": ["a", None, {"deep": [1, 2.5, True]}]},
        "context": {"ip": "203.0.113.7", "page": {"url": f"https://example.com/p/{i % 50}"}},
        "consent": (None, True, False)[i % 3],
    }


async def seed(url: str, n: int, project: str = "shop") -> None:
    """`n` events of `project` (bulk inserts straight into the table)."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            for start in range(0, n, 5000):
                rows = [bulk_event(i, project) for i in range(start, min(n, start + 5000))]
                await conn.execute(insert(tables.events), rows)
    finally:
        await engine.dispose()


def config_file(folder: Path, backend: dict[str, str]) -> Path:
    path = folder / "dialgate.toml"
    path.write_text(f'[storage]\nurl = "{backend["storage_url"]}"\n'
                    '[[projects]]\nname = "shop"\ncohorly_tokens = ["tok_shop"]\n'
                    '[[projects]]\nname = "blog"\ncohorly_tokens = ["tok_blog"]\n')
    return path


# Runs the command given and writes its peak RSS (KB) to the file given. A
# lean process of its own: a child's peak includes the memory of the process
# it was forked from (Linux carries it over exec), so the command is started
# from this one, not from the test's large process.
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes, int]:
    """`dialgate ARGS` in a process of its own: exit status, stdout, stderr
    and the process's peak resident memory (KB)."""
    with tempfile.TemporaryDirectory() as folder:
        peak = os.path.join(folder, "peak")
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, peak, sys.executable, "-m", "gateway.cli", *args],
                              capture_output=True, cwd=ROOT, env=env, check=False)
        with open(peak) as found:
            rss = int(found.read())
    return done.returncode, done.stdout, done.stderr, rss


async def admin_pages(client: Any, project: str = "shop", **params: str) -> Any:
    """Every event of the project through the admin API, page by page."""
    after = ""
    while True:
        reply = await client.get(f"/admin/v1/projects/{project}/events", headers=ADMIN,
                                 params={"limit": "1000", "after": after, **params})
        assert reply.status_code == 200, reply.text
        page = reply.json()
        for item in page["events"]:
            yield item
        if page["next"] is None:
            return
        after = page["next"]
