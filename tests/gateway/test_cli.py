"""The `dialgate` console script, run for real in a subprocess, and the
disabled-dialect switch."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ADMIN, free_port, gateway, settings_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"
DIALGATE = Path(sys.executable).parent / "dialgate"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}
    env.update(extra)
    return env


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DIALGATE), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )


def tables_of(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_console_script_is_installed() -> None:
    assert DIALGATE.is_file(), DIALGATE


# -- check-config --------------------------------------------------------------


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    result = run("check-config", str(EXAMPLE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "1 projects" in result.stdout


def test_check_config_refuses_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[server]\nbind = "127.0.0.1:8000"\n\n[dialects.cohorly]\nrate_limt = 5\n', encoding="utf-8")
    result = run("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "config error" in result.stderr
    assert "dialects.cohorly.rate_limt" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_refuses_a_wrong_type_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "wrong.toml"
    path.write_text('[server]\nworkers = "many"\n', encoding="utf-8")
    result = run("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "server.workers" in result.stderr
    missing = run("check-config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "absent.toml" in missing.stderr


def test_check_config_applies_the_environment(tmp_path: Path) -> None:
    result = run("check-config", str(EXAMPLE), cwd=tmp_path, DIALGATE_SERVER__WORKERS="zero")
    assert result.returncode == 2
    assert "server.workers" in result.stderr


def test_check_config_on_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[storage]\nurl = "caf\xe9"\n')
    result = run("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config error" in result.stderr
    assert "Traceback" not in result.stderr


# -- migrate -------------------------------------------------------------------


def test_migrate_creates_the_tables(tmp_path: Path) -> None:
    db = tmp_path / "migrated.db"
    url = f"sqlite+aiosqlite:///{db}"
    result = run("migrate", cwd=tmp_path, DIALGATE_STORAGE__URL=url)
    assert result.returncode == 0, result.stderr
    assert "head" in result.stdout
    tables = tables_of(db)
    assert {"events", "profiles", "aliases", "devices", "rejections"} <= tables
    # Running it again is a no-op success.
    again = run("migrate", cwd=tmp_path, DIALGATE_STORAGE__URL=url)
    assert again.returncode == 0, again.stderr
    assert tables_of(db) == tables
    assert not (tmp_path / "dialgate.db").exists()  # the URL from the environment was used


# -- serve ---------------------------------------------------------------------


def test_serve_answers_stores_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "served.db"
    config = tmp_path / "dialgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[storage]
url = "sqlite+aiosqlite:///{db}"

[redis]
url = ""

[admin]
keys = ["adm_cli_key"]

[[projects]]
name = "shop"
cohorly_tokens = ["tok_cli"]
""",
        encoding="utf-8",
    )
    stdout, stderr = tmp_path / "out.log", tmp_path / "err.log"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [str(DIALGATE), "serve", "--config", str(config)],
            cwd=tmp_path, env=clean_env(), stdout=out, stderr=err,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, f"server exited early: {stderr.read_text()}"
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)

        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            assert client.get("/readyz").status_code == 200
            reply = client.post(
                "/track",
                json={"event": "Served", "properties": {"token": "tok_cli", "distinct_id": "u1", "$insert_id": "s1"}},
            )
            assert reply.status_code == 200
            assert reply.json() == {"status": 1, "inserted": 1}
            listing = client.get(
                "/admin/v1/projects/shop/events", headers={"Authorization": "Bearer adm_cli_key"}
            ).json()
            assert [(e["name"], e["distinct_id"]) for e in listing["events"]] == [("Served", "u1")]

            # SIGTERM with a keep-alive connection still open: a request sent
            # right after the signal is still answered (the drain phase), and
            # the answer asks the client to close the connection.
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            time.sleep(0.02)
            late = client.post(
                "/track",
                json={"event": "Late", "properties": {"token": "tok_cli", "distinct_id": "u1", "$insert_id": "s2"}},
            )
            assert late.status_code == 200 and late.json() == {"status": 1, "inserted": 1}
            assert late.headers["connection"] == "close"
            assert process.wait(timeout=8) == 0
            assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in stderr.read_text()
    # The migrations ran on start and the event was committed to the file.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name, distinct_id FROM events ORDER BY id").fetchall() == [
            ("Served", "u1"), ("Late", "u1")]


# -- a disabled dialect ---------------------------------------------------------


@pytest.mark.anyio
async def test_disabled_dialect_has_no_routes(backend) -> None:
    # Mixpanel serves these paths too: both off, no route is left.
    settings = settings_for(backend, dialects={"cohorly": {"enabled": False}, "mixpanel": {"enabled": False}})
    async with gateway(settings) as client:
        for path in ("/track", "/engage", "/alias", "/track/"):
            reply = await client.post(
                path,
                headers={"X-Cohorly-Token": "tok_shop"},
                json={"event": "E", "properties": {"distinct_id": "u1"}},
            )
            assert reply.status_code == 404, path
        # The rest of the gateway is up, and nothing was stored.
        assert (await client.get("/healthz")).status_code == 200
        listing = await client.get("/admin/v1/projects/shop/events", headers=ADMIN)
        assert listing.json()["events"] == []


@pytest.mark.anyio
async def test_enabled_dialect_has_its_routes(backend) -> None:
    # The counterpart of the test above, so a 404 there means "disabled".
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track", headers={"X-Cohorly-Token": "tok_shop"}, json={"event": "E", "properties": {"distinct_id": "u1"}}
        )
        assert reply.status_code == 200


# -- one way to name the config, and what serve cannot run ---------------------


def test_check_config_takes_the_file_as_serve_does(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nread_timeout = 0\n', encoding="utf-8")
    for args, env in (((str(EXAMPLE),), {}), (("--config", str(EXAMPLE)), {}),
                      ((), {"DIALGATE_CONFIG": str(EXAMPLE)})):
        result = run("check-config", *args, cwd=tmp_path, **env)
        assert result.returncode == 0, (args, env, result.stderr)
        assert "1 projects" in result.stdout
    for args, env in (((str(bad),), {}), (("--config", str(bad)), {}), ((), {"DIALGATE_CONFIG": str(bad)})):
        result = run("check-config", *args, cwd=tmp_path, **env)
        assert result.returncode == 2, (args, env)
        assert "server.read_timeout" in result.stderr
    both = run("check-config", str(EXAMPLE), "--config", str(bad), cwd=tmp_path)
    assert both.returncode == 2 and "two different files" in both.stderr


@pytest.mark.parametrize("override,key", [
    ({"DIALGATE_STORAGE__URL": "postgresql://postgres@127.0.0.1/db"}, "storage.url"),
    ({"DIALGATE_REDIS__URL": "http://127.0.0.1:6379"}, "redis.url"),
    ({"DIALGATE_SERVER__GRACEFUL_TIMEOUT": "-1"}, "server.graceful_timeout"),
    ({"DIALGATE_DIALECTS__CLIENT__MAX_BODY_BYTES": "0"}, "dialects.client.max_body_bytes"),
])
def test_check_config_and_serve_refuse_what_serve_cannot_run(tmp_path: Path, override, key) -> None:
    for command in (("check-config", str(EXAMPLE)), ("serve", "--config", str(EXAMPLE))):
        result = run(*command, cwd=tmp_path, **override)
        assert result.returncode == 2, (command, result.stderr)
        assert key in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dialgate.db").exists()


def test_serve_refuses_the_example_admin_key_on_a_public_address(tmp_path: Path) -> None:
    result = run("serve", "--config", str(EXAMPLE), cwd=tmp_path, DIALGATE_SERVER__BIND="0.0.0.0:8000")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "adm_change_me" in lines[0], result.stderr
    assert not (tmp_path / "dialgate.db").exists()


def test_serve_with_admin_bind_and_sighup(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    config = tmp_path / "dialgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"

[storage]
url = "sqlite+aiosqlite:///{tmp_path / 'admin.db'}"

[admin]
keys = ["adm_cli_key"]
bind = "127.0.0.1:{admin_port}"

[[projects]]
name = "shop"
cohorly_tokens = ["tok_cli"]
""",
        encoding="utf-8",
    )
    stderr = tmp_path / "err.log"
    with stderr.open("w") as err:
        process = subprocess.Popen([str(DIALGATE), "serve"], cwd=tmp_path, env=clean_env(DIALGATE_CONFIG=str(config)),
                                   stdout=subprocess.DEVNULL, stderr=err)
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    key = {"Authorization": "Bearer adm_cli_key"}
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, stderr.read_text()
            try:
                if httpx.get(admin + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        track = {"event": "E", "properties": {"token": "tok_cli", "distinct_id": "u"}}
        assert httpx.post(public + "/track", json=track, timeout=10).status_code == 200
        for path in ("/admin/v1/projects/shop/events", "/metrics", "/readyz"):
            assert httpx.get(public + path, headers=key, timeout=10).status_code == 404, path
            assert httpx.get(admin + path, headers=key, timeout=10).status_code == 200, path
        # SIGHUP: the same file reloaded, nothing else changes.
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None
        assert httpx.get(public + "/healthz", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = stderr.read_text()
    assert log.count("configuration reloaded") == 1 and "nothing changed" in log, log
    assert "admin method=GET path=/admin/v1/projects/shop/events status=200 peer=127.0.0.1" in log
    assert "adm_cli_key" not in log and "Traceback" not in log
