"""Configuration: the example file, strict decoding, environment overrides,
and the settings types (gateway/config.py; the checks: test_checks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, Settings, from_dict, load

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def refused(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw, environ or {})
    return str(info.value)


# -- the example file --------------------------------------------------------


def test_example_config_decodes() -> None:
    settings = load(EXAMPLE, environ={})
    assert isinstance(settings, Settings)
    assert settings.server.bind == "127.0.0.1:8000"
    assert settings.server.workers == 1
    assert settings.server.trusted_proxies == []
    assert settings.storage.url == "sqlite+aiosqlite:///./dialgate.db"
    assert settings.storage.migrate_on_start is True
    assert settings.redis.url == ""
    assert settings.redis.dedup_ttl_seconds == 86400
    assert settings.admin.keys == ["adm_change_me"]
    [shop] = settings.projects
    assert shop.name == "shop"
    assert shop.cohorly_tokens == ["tok_shop"]
    assert shop.client_keys == ["pk_shop", "sk_shop"]
    assert [(s.site, s.token) for s in shop.collect_sources] == [(1234, "src_shop")]
    cohorly = settings.dialect_config("cohorly")
    assert cohorly.enabled is True
    assert (cohorly.rate_limit.requests, cohorly.rate_limit.per_seconds) == (100, 10)
    assert cohorly.max_batch == 500
    assert cohorly.max_body_bytes == 1_048_576


def test_example_config_values_are_the_defaults() -> None:
    # The example promises "the values shown are the defaults": only the
    # sample admin key and project differ from an empty config.
    example = load(EXAMPLE, environ={})
    empty = from_dict({}, {})
    assert example.server == empty.server
    assert example.storage == empty.storage
    assert example.redis == empty.redis
    assert example.quarantine == empty.quarantine
    assert example.retention == empty.retention
    assert example.dialects == empty.dialects


# -- unknown keys and wrong types ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"serverz": {}}, "serverz"),
        ({"server": {"workerz": 2}}, "server.workerz"),
        ({"projects": [{"name": "a"}, {"name": "b", "tokenz": ["t"]}]}, "projects[1].tokenz"),
        ({"dialects": {"cohorly": {"enabld": True}}}, "dialects.cohorly.enabld"),
        (
            {"dialects": {"cohorly": {"rate_limit": {"requests": 1, "per_seconds": 1, "burst": 2}}}},
            "dialects.cohorly.rate_limit.burst",
        ),
        ({"dialects": {"nosuch": {}}}, "dialects.nosuch"),
    ],
)
def test_unknown_key_is_refused_with_its_path(raw: dict[str, Any], path: str) -> None:
    message = refused(raw)
    assert message.startswith(path + ":"), message
    assert "unknown" in message


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"server": {"workers": "many"}}, "server.workers"),
        ({"server": {"workers": True}}, "server.workers"),
        ({"storage": {"url": 5}}, "storage.url"),
        ({"admin": {"keys": "adm_one"}}, "admin.keys"),
        ({"projects": [{"name": "a", "collect_sources": [{"site": "x", "token": "t"}]}]},
         "projects[0].collect_sources[0].site"),
        ({"dialects": {"cohorly": {"enabled": [1]}}}, "dialects.cohorly.enabled"),
        ({"dialects": {"cohorly": {"rate_limit": {"requests": "lots", "per_seconds": 1}}}},
         "dialects.cohorly.rate_limit.requests"),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"logging": {"level": "INFO"}}, "logging.level"),  # the names are lower case, as DESIGN.md's
        ({"logging": {"access_log": "sometimes"}}, "logging.access_log"),
    ],
)
def test_wrong_type_names_the_key_path(raw: dict[str, Any], path: str) -> None:
    assert path in refused(raw)


def test_missing_required_key_is_refused() -> None:
    message = refused({"projects": [{"cohorly_tokens": ["t"]}]})
    assert "projects[0]" in message and "name" in message


# -- environment overrides ----------------------------------------------------


def test_environment_overrides_scalars() -> None:
    settings = load(
        EXAMPLE,
        environ={
            "DIALGATE_STORAGE__URL": "postgresql+asyncpg://dg:pw@db.internal:5432/dialgate",
            "DIALGATE_SERVER__WORKERS": "4",
            "DIALGATE_DIALECTS__COHORLY__ENABLED": "false",
            "DIALGATE_REDIS__RETRY_INTERVAL": "0.5",
            "UNRELATED": "x",
        },
    )
    assert settings.storage.url == "postgresql+asyncpg://dg:pw@db.internal:5432/dialgate"
    assert settings.server.workers == 4
    assert type(settings.server.workers) is int
    assert settings.dialect_config("cohorly").enabled is False
    assert settings.redis.retry_interval == 0.5
    # Untouched values still come from the file.
    assert settings.server.bind == "127.0.0.1:8000"
    assert settings.admin.keys == ["adm_change_me"]


def test_environment_json_overrides() -> None:
    settings = load(
        EXAMPLE,
        environ={
            "DIALGATE_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8", "192.168.0.0/16"]',
            "DIALGATE_ADMIN__KEYS": '["adm_a", "adm_b"]',
            "DIALGATE_DIALECTS__COHORLY__RATE_LIMIT": '{"requests": 7, "per_seconds": 2}',
        },
    )
    assert settings.server.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]
    assert settings.admin.keys == ["adm_a", "adm_b"]
    limit = settings.dialect_config("cohorly").rate_limit
    assert (limit.requests, limit.per_seconds) == (7, 2)


def test_environment_without_a_file() -> None:
    settings = load(None, environ={"DIALGATE_STORAGE__URL": "sqlite+aiosqlite:///x.db"})
    assert settings.storage.url == "sqlite+aiosqlite:///x.db"
    assert settings.projects == []


def test_environment_override_is_validated() -> None:
    assert "server.workers" in refused({}, {"DIALGATE_SERVER__WORKERS": "four"})
    assert "DIALGATE_SERVER__TRUSTED_PROXIES" in refused({}, {"DIALGATE_SERVER__TRUSTED_PROXIES": "[1"})
    assert refused({}, {"DIALGATE_SERVER__WORKERZ": "3"}).startswith("server.workerz:")
    assert "server.trusted_proxies[0]" in refused({}, {"DIALGATE_SERVER__TRUSTED_PROXIES": '["nope"]'})


def test_environment_overrides_a_scalar_inside_a_defaulted_table() -> None:
    # The other keys of the table keep their defaults ...
    settings = from_dict({}, {"DIALGATE_DIALECTS__COHORLY__RATE_LIMIT__REQUESTS": "7"})
    limit = settings.dialect_config("cohorly").rate_limit
    assert (limit.requests, limit.per_seconds) == (7, 10)
    assert settings.dialect_config("cohorly").enabled is True
    # ... or their values from the file.
    settings = from_dict(
        {"dialects": {"cohorly": {"rate_limit": {"requests": 1, "per_seconds": 60}}}},
        {"DIALGATE_DIALECTS__COHORLY__RATE_LIMIT__REQUESTS": "7"},
    )
    limit = settings.dialect_config("cohorly").rate_limit
    assert (limit.requests, limit.per_seconds) == (7, 60)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load(missing, environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nworkers = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(path, environ={})


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[storage]\nurl = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        load(path, environ={})


def test_load_uses_the_process_environment_by_default(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nworkers = 2\n', encoding="utf-8")
    monkeypatch.setenv("DIALGATE_SERVER__WORKERS", "3")
    assert load(path).server.workers == 3
    assert load(path, environ={}).server.workers == 2


def test_logging_from_the_environment() -> None:
    settings = from_dict({}, {"DIALGATE_LOGGING__FORMAT": "json", "DIALGATE_LOGGING__ACCESS_LOG": "true",
                              "DIALGATE_LOGGING__LEVEL": "warning"})
    assert (settings.logging.format, settings.logging.level, settings.logging.access_log) == ("json", "warning", True)
