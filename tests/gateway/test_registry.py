"""Dialects are found through the `dialgate.dialects` entry points
(gateway/registry.py): the shipped ones, a plug-in installed from a
distribution of its own (tests/plugin/dialgate-echo) serving for real, and
plug-ins that cannot be used refused at start, naming their entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dialects.base import Dialect
from gateway.registry import PluginError, check, discover
from tests.plugin import echo
from tests.support import free_port

DIALGATE = Path(sys.executable).parent / "dialgate"


def env_with(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH", "")]))
    return env


def test_the_shipped_dialects_are_found_through_the_entry_points_in_order() -> None:
    assert [d.name for d in discover()] == ["client", "cohorly", "collect", "inslytic", "mixpanel"]


def test_an_installed_plugin_serves_stores_and_is_measured(tmp_path: Path) -> None:
    site = echo.install(tmp_path)
    port, db = free_port(), tmp_path / "echo.db"
    config = tmp_path / "dialgate.toml"
    config.write_text(
        f"""
[server]
bind = "127.0.0.1:{port}"
[storage]
url = "sqlite+aiosqlite:///{db}"
[admin]
keys = ["adm_plugin"]
[[projects]]
name = "shop"
cohorly_tokens = ["tok_shop"]
echo_keys = ["echo_shop"]
echo_label = "from-config"
[dialects.echo]
max_body_bytes = 1000
""",
        encoding="utf-8",
    )
    env = env_with(site)
    checked = subprocess.run([str(DIALGATE), "check-config", str(config)], env=env, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    stderr = tmp_path / "err.log"
    with stderr.open("w") as err:
        process = subprocess.Popen([str(DIALGATE), "serve", "--config", str(config)], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
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
        admin = {"Authorization": "Bearer adm_plugin"}
        with httpx.Client(base_url=base, timeout=10) as client:
            key = {"X-Echo-Key": "echo_shop"}
            sent = client.post("/echo", json=[{"name": "Ping", "id": "u1", "insert_id": "p1"},
                                              {"name": "Pong", "id": "u2"}], headers=key)
            assert (sent.status_code, sent.json()) == (200, {"echoed": 2, "duplicates": 0})
            again = client.post("/echo", json={"name": "Ping", "id": "u1", "insert_id": "p1"}, headers=key)
            assert again.json() == {"echoed": 0, "duplicates": 1}
            refused = client.post("/echo", json={"name": "Ping", "id": "u1"}, headers={"X-Echo-Key": "nope"})
            assert (refused.status_code, refused.json()) == (401, {"echo_error": "unauthorized"})
            large = client.post("/echo", content=b" " * 2000, headers=key)
            assert (large.status_code, large.json()) == (413, {"echo_error": "too_large"})
            # A shipped dialect beside it, unchanged.
            track = client.post("/track", json={"event": "E", "properties": {"token": "tok_shop", "distinct_id": "u3"}})
            assert track.json() == {"status": 1, "inserted": 1}
            events = client.get("/admin/v1/projects/shop/events", params={"source": "echo"}, headers=admin).json()
            assert [(e["name"], e["distinct_id"], e["properties"]) for e in events["events"]] == [
                ("Ping", "u1", {"label": "from-config"}), ("Pong", "u2", {"label": "from-config"})]
            metrics = client.get("/metrics", headers=admin).text
            assert 'dialgate_events_received_total{dialect="echo",project="shop"} 3' in metrics
            assert 'dialgate_events_stored_total{dialect="echo",project="shop"} 2' in metrics
            assert 'dialgate_rejections_total{dialect="echo",reason="unauthorized"} 1' in metrics
            assert '_bucket{dialect="echo",endpoint="echo",le="+Inf"} 4.0' in metrics
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert "Traceback" not in stderr.read_text()


def broken_distribution(root: Path, value: str, module_source: str, name: str = "broken") -> Path:
    """A distribution installed by hand: a module and its dist-info with one
    entry point in the group."""
    root.mkdir(exist_ok=True)
    (root / "broken_dialect.py").write_text(module_source, encoding="utf-8")
    info = root / "dialgate_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dialgate-broken\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[dialgate.dialects]\n{name} = {value}\n", encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("source", "value", "name", "expected"),
    [
        ("import no_such_module\n", "broken_dialect:Broken", "broken", "cannot be loaded: ModuleNotFoundError"),
        ("class Broken:\n    name = 'broken'\n", "broken_dialect:Broken", "broken", "not a subclass"),
        ("from dialects.cohorly import Cohorly as Broken\n", "broken_dialect:Broken", "cohorly", "is taken by"),
    ],
)
def test_a_broken_plugin_is_a_startup_error_naming_its_entry_point(
    tmp_path: Path, source: str, value: str, name: str, expected: str
) -> None:
    site = broken_distribution(tmp_path / "site", value, source, name)
    for command in (["check-config"], ["serve", "--no-migrate"]):
        result = subprocess.run([str(DIALGATE), *command], cwd=tmp_path, env=env_with(site),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (command, result.stderr)
        assert "config error: dialect entry point" in result.stderr
        assert f"'{name}' (broken_dialect:Broken, from dialgate-broken)" in result.stderr
        assert expected in result.stderr


def test_the_registry_checks_every_dialect() -> None:
    Echo = echo.module().Echo

    class Clash(Echo):  # type: ignore[misc,valid-type]
        name = "clash"

    with pytest.raises(PluginError, match="'echo_keys' is already declared by echo"):
        check([("echo", Echo), ("clash", Clash)])
    with pytest.raises(PluginError, match="must be a Struct with `enabled`"):
        check([("bare", type("Bare", (Dialect,), {"name": "bare"}))])
    assert check([("echo", Echo)]) == (Echo,)
