"""What `dialgate serve` and `dialgate migrate` do when they cannot start:
one line on stderr naming the cause, no password, a non-zero exit. Each
case runs the installed console script in a subprocess."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from gateway.startup import cause
from tests.gateway.test_cli import clean_env
from tests.support import free_port

DIALGATE = Path(sys.executable).parent / "dialgate"
SECRET = "s3cr%40t-pw"  # "s3cr@t-pw" URL-encoded: neither spelling may be printed


def config(tmp_path: Path, *, port: int | None = None, workers: int = 1) -> Path:
    path = tmp_path / "dialgate.toml"
    path.write_text(
        f"""
[server]
bind = "127.0.0.1:{port or free_port()}"
workers = {workers}

[storage]
url = "sqlite+aiosqlite:///{tmp_path / 'start.db'}"

[admin]
keys = ["adm_start_key"]

[[projects]]
name = "shop"
cohorly_tokens = ["tok_start"]
""",
        encoding="utf-8",
    )
    return path


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DIALGATE), *args], cwd=tmp_path, env=clean_env(**env), capture_output=True,
                          text=True, timeout=60)


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The only stderr line, once the exit status and stdout are as a failed
    start leaves them."""
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert "s3cr" not in lines[0] and "Traceback" not in lines[0]
    assert lines[0].startswith("dialgate: ")
    return lines[0]


def dead_postgres() -> str:
    return f"postgresql+asyncpg://dialgate:{SECRET}@127.0.0.1:{free_port()}/dialgate"


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unreachable_postgresql(tmp_path: Path, command: str) -> None:
    url = dead_postgres()
    line = one_line(run(tmp_path, command, "--config", str(config(tmp_path)), DIALGATE_STORAGE__URL=url), 1)
    masked = url.replace(SECRET, "***")
    assert line == f"dialgate: cannot connect to the database {masked}: Connection refused"


def test_an_unreachable_postgresql_without_migrations(tmp_path: Path) -> None:
    # Not migrating does not mean not connecting: a gateway that cannot reach
    # its database at start is not started.
    result = run(tmp_path, "serve", "--no-migrate", "--config", str(config(tmp_path)),
                 DIALGATE_STORAGE__URL=dead_postgres())
    assert "cannot connect to the database" in one_line(result, 1)


def test_a_host_name_that_does_not_resolve(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://dialgate:{SECRET}@dialgate-db.invalid/dialgate"
    line = one_line(run(tmp_path, "migrate", DIALGATE_STORAGE__URL=url), 1)
    assert "dialgate-db.invalid" in line and "cannot resolve the host name" in line


def test_a_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/missing-dir/dialgate.db"
    line = one_line(run(tmp_path, "serve", "--config", str(config(tmp_path)), DIALGATE_STORAGE__URL=url), 1)
    assert line == f"dialgate: cannot connect to the database {url}: unable to open database file"


@pytest.mark.postgres
def test_a_postgresql_database_that_does_not_exist(tmp_path: Path, pg_database: str) -> None:
    # The server answers; the database is not there.
    url = pg_database.rpartition("/")[0] + "/dialgate_no_such_database"
    line = one_line(run(tmp_path, "migrate", DIALGATE_STORAGE__URL=url), 1)
    assert line.endswith(': database "dialgate_no_such_database" does not exist'), line


def test_a_failed_migration(tmp_path: Path) -> None:
    # A database migrated by a newer release than this one (a downgrade).
    db = tmp_path / "start.db"
    assert run(tmp_path, "migrate", "--config", str(config(tmp_path))).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    line = one_line(run(tmp_path, "serve", "--config", str(config(tmp_path))), 1)
    assert line.startswith(f"dialgate: migrating the database sqlite+aiosqlite:///{db} failed: ")
    assert "ffffffffffff" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreachable_redis(tmp_path: Path, workers: int) -> None:
    where = f"127.0.0.1:{free_port()}/0"
    result = run(tmp_path, "serve", "--config", str(config(tmp_path, workers=workers)),
                 DIALGATE_REDIS__URL=f"redis://:{SECRET}@{where}")
    assert one_line(result, 1) == f"dialgate: cannot connect to Redis at redis://:***@{where}: Connection refused"


@pytest.mark.redis
def test_a_redis_that_refuses(tmp_path: Path, redis_server: str) -> None:
    # The server answers, but not to this URL (databases 0-15 by default).
    url = redis_server.rpartition("/")[0] + "/999"
    line = one_line(run(tmp_path, "serve", "--config", str(config(tmp_path)), DIALGATE_REDIS__URL=url), 1)
    assert line.endswith(": DB index is out of range"), line


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path, "serve", "--config", str(config(tmp_path, port=port, workers=workers)))
    assert one_line(result, 2) == f"dialgate: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "start.db").exists()  # refused before touching the database


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_bad_config_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[storage]\nurl = "sqlite+aiosqlite:///x.db"\nbatch_max_rows = "many"\n', encoding="utf-8")
    line = one_line(run(tmp_path, command, "--config", str(path)), 2)
    assert line.startswith("dialgate: config error: ") and "storage.batch_max_rows" in line
    unparsable = tmp_path / "broken.toml"
    unparsable.write_text("[server\nbind = 1\n", encoding="utf-8")
    line = one_line(run(tmp_path, command, "--config", str(unparsable)), 2)
    assert "broken.toml: invalid TOML" in line


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    result = run(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"dialgate {version('dialgate')}\n"


# -- the cause, in-process ------------------------------------------------------


def test_cause_is_the_innermost_exception_on_one_line() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        except OSError as inner:
            raise DBAPIError("SELECT 1", None, inner) from inner
    except DBAPIError as outer:
        assert cause(outer, "") == "Connection refused"
    assert cause(ValueError("line one\n  line two"), "") == "line one line two"
    assert cause(KeyError(), "") == "KeyError"
    assert len(cause(ValueError("x" * 1000), "")) == 300


@pytest.mark.parametrize("url", [
    "postgresql+asyncpg://user:p%40ss-word@db/x",
    "postgresql+asyncpg://user@db/x?password=p@ss-word",
    "redis://:p@ss-word@cache:6379/0",
])
def test_cause_masks_the_password_of_the_url(url: str) -> None:
    # A driver that quotes its input back must not print the password.
    assert cause(ValueError("bad password 'p@ss-word' and 'p%40ss-word'"), url) == "bad password '***' and '***'"
