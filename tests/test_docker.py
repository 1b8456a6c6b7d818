"""The image built from the Dockerfile and run, with Docker or Podman,
whichever answers (`docker info`, then `podman info`); skipped with the
reason when neither does. The base image is the Dockerfile's default
(python:3.12-slim) unless DIALGATE_TEST_PYTHON_IMAGE names another (a local
Debian-based one with python3 and venv, where no registry is reachable);
when the engine can neither find nor pull it, the tests skip and say so.
The build downloads the dependencies from the package index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("DIALGATE_TEST_PYTHON_IMAGE", "python:3.12-slim")
BUILD_TIMEOUT = 900


def _engine() -> tuple[str, str]:
    """(the engine's program, or "", and why none answers)."""
    reasons = []
    for name in ("docker", "podman"):
        program = shutil.which(name)
        if program is None:
            reasons.append(f"{name} is not installed")
            continue
        info = subprocess.run([program, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return program, ""
        said = (info.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"`{name} info` failed: {said}")
    return "", "; ".join(reasons)


ENGINE, WHY_NOT = _engine()
pytestmark = pytest.mark.skipif(not ENGINE, reason=f"no container engine answers ({WHY_NOT})")


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{ENGINE} {' '.join(args)}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if engine("image", "inspect", BASE, check=False).returncode != 0:
        pulled = engine("pull", BASE, timeout=600, check=False)
        if pulled.returncode != 0:
            said = (pulled.stderr.strip().splitlines() or ["no output"])[-1][:300]
            pytest.skip(f"{ENGINE} cannot get the base image {BASE} ({said}); "
                        "set DIALGATE_TEST_PYTHON_IMAGE to a local Debian-based python3 image")
    tag = f"localhost/dialgate-test:{uuid.uuid4().hex[:12]}"
    # The docker format keeps HEALTHCHECK (Podman writes OCI images by default).
    fmt = ["--format", "docker"] if Path(ENGINE).name == "podman" else []
    engine("build", *fmt, "--build-arg", f"PYTHON_IMAGE={BASE}", "-t", tag, str(ROOT), timeout=BUILD_TIMEOUT)
    yield tag
    engine("rmi", "-f", tag, check=False)


def config(tmp_path: Path) -> Path:
    path = tmp_path / "dialgate.toml"
    path.write_text(
        """
[server]
bind = "0.0.0.0:8000"

[storage]
url = "sqlite+aiosqlite:////var/lib/dialgate/dialgate.db"

[admin]
keys = ["adm_image_test_key"]

[[projects]]
name = "shop"
cohorly_tokens = ["tok_image"]
""",
        encoding="utf-8",
    )
    path.chmod(0o644)  # read by the image's user
    return path


def wait_healthy(base: str, container: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = engine("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip()
        assert state == "true", engine("logs", container, check=False).stderr
        assert time.monotonic() < deadline, "the container did not come up"
        time.sleep(0.2)


def test_version_and_user(image: str) -> None:
    result = engine("run", "--rm", "--no-healthcheck", image, "--version")
    assert result.stdout == f"dialgate {version('dialgate')}\n"
    ids = engine("run", "--rm", "--no-healthcheck", "--entrypoint", "id", image).stdout
    assert ids.startswith("uid=10001(dialgate) gid=10001(dialgate)"), ids


def test_the_image_config_starts_as_is(image: str) -> None:
    # No project, no admin key: it serves (and refuses every credential).
    name = f"dialgate-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    engine("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", image)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, name)
        reply = httpx.post(base + "/track", headers={"X-Cohorly-Token": "tok_x"},
                           json={"event": "E", "properties": {"distinct_id": "u"}}, timeout=10)
        assert reply.status_code == 401
    finally:
        engine("rm", "-f", "-v", name, check=False)


def test_serve_store_stop_and_keep_the_data_in_the_volume(image: str, tmp_path: Path) -> None:
    volume = f"dialgate-test-{uuid.uuid4().hex[:8]}"
    mount = ["-v", f"{volume}:/var/lib/dialgate", "-v", f"{config(tmp_path)}:/etc/dialgate/dialgate.toml:ro"]
    admin = {"Authorization": "Bearer adm_image_test_key"}
    names = [f"{volume}-a", f"{volume}-b"]
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        engine("run", "-d", "--name", names[0], "-p", f"127.0.0.1:{port}:8000", *mount, image)
        wait_healthy(base, names[0])
        track = {"event": "Contained", "properties": {"distinct_id": "u1", "$insert_id": "c1"}}
        reply = httpx.post(base + "/track", headers={"X-Cohorly-Token": "tok_image"}, json=track, timeout=10)
        assert reply.json() == {"status": 1, "inserted": 1}
        # The image's HEALTHCHECK command, run in the container as the engine would.
        check = json.loads(engine("inspect", "--format", "{{json .Config.Healthcheck}}", names[0]).stdout)
        assert check["Test"][0] == "CMD"
        assert engine("exec", names[0], *check["Test"][1:], check=False).returncode == 0
        started = time.monotonic()
        engine("stop", "--time", "20", names[0], timeout=60)
        assert time.monotonic() - started < 15  # drained and exited, not killed after the grace time
        state = engine("inspect", "--format", "{{.State.ExitCode}}", names[0]).stdout.strip()
        assert state == "0", engine("logs", names[0], check=False).stderr
        logs = engine("logs", names[0]).stderr
        assert "Traceback" not in logs and "serving on http://0.0.0.0:8000" in logs

        # A new container on the same volume has the event.
        engine("run", "-d", "--name", names[1], "-p", f"127.0.0.1:{port}:8000", *mount, image)
        wait_healthy(base, names[1])
        listing = httpx.get(base + "/admin/v1/projects/shop/events", headers=admin, timeout=10).json()
        assert [(e["name"], e["insert_id"]) for e in listing["events"]] == [("Contained", "c1")]
    finally:
        for name in names:
            engine("rm", "-f", "-v", name, check=False)
        engine("volume", "rm", "-f", volume, check=False)


def test_on_postgresql_and_redis(image: str, tmp_path: Path, postgres_backend: dict[str, str]) -> None:
    # The drivers inside the image (asyncpg, hiredis) against the servers
    # the other tests use, reached over the host's network.
    name = f"dialgate-test-{uuid.uuid4().hex[:8]}"
    bind = f"127.0.0.1:{free_port()}"
    engine("run", "-d", "--name", name, "--network", "host", "--no-healthcheck",
           "-e", f"DIALGATE_STORAGE__URL={postgres_backend['storage_url']}",
           "-e", f"DIALGATE_REDIS__URL={postgres_backend['redis_url']}",
           "-e", f"DIALGATE_REDIS__KEY_PREFIX={postgres_backend['redis_prefix']}",
           "-e", f"DIALGATE_SERVER__BIND={bind}",
           "-v", f"{config(tmp_path)}:/etc/dialgate/dialgate.toml:ro", image)
    try:
        base = f"http://{bind}"
        wait_healthy(base, name)
        track = {"event": "Contained", "properties": {"distinct_id": "u1", "$insert_id": "p1"}}
        replies = [httpx.post(base + "/track", headers={"X-Cohorly-Token": "tok_image"}, json=track, timeout=10)
                   for _ in range(2)]
        assert [r.json() for r in replies] == [{"status": 1, "inserted": 1}, {"status": 1, "inserted": 0}]
        ready = httpx.get(base + "/readyz", timeout=10)
        assert ready.json() == {"status": "ready", "database": True, "redis": True}
    finally:
        engine("rm", "-f", "-v", name, check=False)


def test_a_start_up_failure_is_one_line(image: str) -> None:
    url = "postgresql+asyncpg://dialgate:hunter2@127.0.0.1:1/dialgate"
    result = engine("run", "--rm", "--no-healthcheck", "-e", f"DIALGATE_STORAGE__URL={url}", image, check=False)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dialgate:")]
    assert lines == ["dialgate: cannot connect to the database "
                     "postgresql+asyncpg://dialgate:***@127.0.0.1:1/dialgate: Connection refused"], result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
