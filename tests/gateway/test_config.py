"""Configuration: the example file, strict decoding, environment overrides,
cross-checks and secret masking (gateway/config.py)."""

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


# -- cross-checks --------------------------------------------------------------


def test_credential_shared_by_two_projects_same_kind() -> None:
    message = refused(
        {"projects": [{"name": "a", "cohorly_tokens": ["dup_cred"]}, {"name": "b", "cohorly_tokens": ["dup_cred"]}]}
    )
    assert "projects[1].cohorly_tokens" in message
    assert "'a'" in message and "'b'" in message
    assert "dup_cred" not in message  # the credential itself is not echoed


def test_credential_shared_by_two_projects_across_kinds() -> None:
    message = refused(
        {"projects": [{"name": "a", "cohorly_tokens": ["shared"]}, {"name": "b", "inslytic_keys": ["shared"]}]}
    )
    assert "projects[1].inslytic_keys" in message
    assert "shared" not in message


def test_collect_source_shared_by_two_projects() -> None:
    source = {"site": 7, "token": "src"}
    message = refused(
        {"projects": [{"name": "a", "collect_sources": [source]}, {"name": "b", "collect_sources": [source]}]}
    )
    assert "projects[1].collect_sources" in message


def test_distinct_credentials_are_fine() -> None:
    settings = from_dict(
        {
            "projects": [
                {"name": "a", "cohorly_tokens": ["t1"], "collect_sources": [{"site": 1, "token": "s"}]},
                {"name": "b", "cohorly_tokens": ["t2"], "collect_sources": [{"site": 2, "token": "s"}]},
            ]
        },
        {},
    )
    assert [p.name for p in settings.projects] == ["a", "b"]


def test_duplicate_project_names() -> None:
    message = refused({"projects": [{"name": "shop"}, {"name": "blog"}, {"name": "shop"}]})
    assert "projects[2].name" in message
    assert "shop" in message


def test_empty_project_name() -> None:
    assert "projects[0].name" in refused({"projects": [{"name": ""}]})


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-network", "10.0.0.300/8", ""])
def test_bad_cidr_in_trusted_proxies(bad: str) -> None:
    message = refused({"server": {"trusted_proxies": ["10.0.0.0/8", bad]}})
    assert "server.trusted_proxies[1]" in message


def test_good_cidrs_in_trusted_proxies() -> None:
    settings = from_dict({"server": {"trusted_proxies": ["10.0.0.0/8", "::1/128", "127.0.0.1"]}}, {})
    assert len(settings.server.trusted_proxies) == 3


def test_other_checks() -> None:
    assert "server.workers" in refused({"server": {"workers": 0}})
    assert "server.bind" in refused({"server": {"bind": "localhost"}})
    assert "admin.keys" in refused({"admin": {"keys": ["ok", ""]}})


# -- secrets stay out of repr ---------------------------------------------------


def test_secrets_are_masked_in_repr() -> None:
    settings = from_dict(
        {
            "storage": {"url": "postgresql+asyncpg://dialgate:s3cr3t-pw@db:5432/dialgate"},
            "redis": {"url": "redis://:r3d1s-pw@cache:6379/0"},
            "admin": {"keys": ["adm_super_secret"]},
            "projects": [
                {
                    "name": "shop",
                    "cohorly_tokens": ["tok_secret_1"],
                    "client_keys": ["pk_secret_2", "sk_secret_3"],
                    "inslytic_keys": ["ins_secret_4"],
                    "collect_sources": [{"site": 1, "token": "src_secret_5"}],
                }
            ],
        },
        {},
    )
    for text in (repr(settings), str(settings), repr(settings.storage), repr(settings.admin),
                 repr(settings.projects), repr(settings.redis)):
        for secret in ("s3cr3t-pw", "r3d1s-pw", "adm_super_secret", "tok_secret_1", "pk_secret_2",
                       "sk_secret_3", "ins_secret_4", "src_secret_5"):
            assert secret not in text
    # What is not secret is still shown.
    text = repr(settings)
    assert "dialgate:***@db:5432/dialgate" in text
    assert "'shop'" in text


def test_a_password_given_as_a_url_parameter_is_masked_too() -> None:
    settings = from_dict(
        {
            "storage": {"url": "postgresql+asyncpg://db:5432/dialgate?user=gw&password=q-s3cr3t&ssl=require"},
            "redis": {"url": "redis://cache:6379/0?Password=r-s3cr3t"},
            "projects": [{"name": "shop", "cohorly_tokens": ["tok_x"]}],
        },
        {},
    )
    text = repr(settings)
    assert "q-s3cr3t" not in text and "r-s3cr3t" not in text
    assert "db:5432/dialgate?user=gw&password=***&ssl=require" in text
    assert "cache:6379/0?Password=***" in text


# -- reading files -------------------------------------------------------------


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


# -- what serve cannot run is refused here (so check-config refuses it too) ----


@pytest.mark.parametrize("url", [
    "postgresql://postgres@127.0.0.1/db", "postgres://x@h/db", "sqlite:///./x.db", "mysql+aiomysql://h/db",
    "./dialgate.db", "sqlite+pysqlite:///x.db",
])
def test_unsupported_storage_url_is_refused(url: str) -> None:
    assert "storage.url" in refused({"storage": {"url": url}})


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://127.0.0.1:port/0",
                                 "redis://127.0.0.1:70000/0"])
def test_unsupported_redis_url_is_refused(url: str) -> None:
    assert "redis.url" in refused({"redis": {"url": url}})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/1",
                                 "unix:///run/redis.sock", "redis://[::1]:6379/0"])
def test_supported_redis_urls_are_accepted(url: str) -> None:
    assert from_dict({"redis": {"url": url}}, {}).redis.url == url


@pytest.mark.parametrize("section,key", [
    ("server", "read_timeout"), ("server", "graceful_timeout"), ("server", "max_connections"),
    ("server", "workers"), ("storage", "batch_max_rows"), ("storage", "writer_lanes"),
    ("storage", "unavailable_retry_after"), ("redis", "dedup_ttl_seconds"), ("redis", "retry_interval"),
    ("redis", "local_dedup_max_entries"), ("quarantine", "per_minute"), ("quarantine", "excerpt_bytes"),
])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_numbers_are_refused(section: str, key: str, value: int) -> None:
    assert f"{section}.{key}" in refused({section: {key: value}})


def test_zero_or_negative_limits_of_a_dialect_are_refused_too() -> None:
    assert "dialects.cohorly.max_body_bytes" in refused({"dialects": {"cohorly": {"max_body_bytes": 0}}})
    assert "dialects.cohorly.rate_limit.requests" in refused(
        {"dialects": {"cohorly": {"rate_limit": {"requests": -5, "per_seconds": 10}}}})
    assert "dialects.inslytic.events_per_minute" in refused({"dialects": {"inslytic": {"events_per_minute": 0}}})


def test_infinite_or_nan_numbers_are_refused_and_a_zero_delay_is_fine() -> None:
    assert "redis.retry_interval" in refused({"redis": {"retry_interval": float("inf")}})
    assert "redis.retry_interval" in refused({"redis": {"retry_interval": float("nan")}})
    assert "storage.batch_delay_ms" in refused({"storage": {"batch_delay_ms": -1}})
    assert from_dict({"storage": {"batch_delay_ms": 0}}, {}).storage.batch_delay_ms == 0


def test_bind_ports_must_be_valid_and_the_admin_listener_apart() -> None:
    assert "server.bind" in refused({"server": {"bind": "127.0.0.1:70000"}})
    assert "admin.bind" in refused({"admin": {"bind": "127.0.0.1"}})
    assert "admin.bind" in refused({"server": {"bind": "0.0.0.0:8000"}, "admin": {"bind": "127.0.0.1:8000"}})
    settings = from_dict({"admin": {"bind": "127.0.0.1:9100"}}, {})
    assert settings.admin.bind == "127.0.0.1:9100"


@pytest.mark.parametrize("sections", [
    {"server": {"bind": "0.0.0.0:8000"}},
    {"server": {"bind": "[::]:8000"}},
    {"server": {"bind": "gateway.example:8000"}},
    {"admin": {"bind": "0.0.0.0:9100"}},
    {"server": {"bind": "127.0.0.1:8000"}, "admin": {"bind": "10.0.0.5:9100"}},
])
def test_the_example_admin_key_is_refused_off_loopback(sections: dict[str, Any]) -> None:
    admin = {"keys": ["adm_change_me"], **sections.get("admin", {})}
    message = refused({**sections, "admin": admin})
    assert "adm_change_me" in message and "admin.keys" in message


@pytest.mark.parametrize("sections", [
    {"server": {"bind": "127.0.0.1:8000"}},
    {"server": {"bind": "[::1]:8000"}},
    {"server": {"bind": "localhost:8000"}},
    {"server": {"bind": "0.0.0.0:8000"}, "admin": {"bind": "127.0.0.1:9100"}},
])
def test_the_example_admin_key_is_allowed_on_loopback(sections: dict[str, Any]) -> None:
    admin = {"keys": ["adm_change_me"], **sections.get("admin", {})}
    assert from_dict({**sections, "admin": admin}, {}).admin.keys == ["adm_change_me"]
