"""The checks of loaded settings (gateway/checks.py): credentials unique per
project and able to pick a dialect, usable numbers, binds and URLs, the
example admin key off loopback; and passwords masked in URLs."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.checks import mask_url
from gateway.config import ConfigError, from_dict


def refused(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw, environ or {})
    return str(info.value)


def test_mask_url_hides_passwords_in_user_info_and_parameters() -> None:
    assert mask_url("postgresql+asyncpg://u:secret@h:5432/db") == "postgresql+asyncpg://u:***@h:5432/db"
    assert mask_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert mask_url("postgresql+asyncpg://u@h/db?password=s&sslmode=x") == (
        "postgresql+asyncpg://u:***@h/db?password=***&sslmode=x"
    )
    assert mask_url("sqlite+aiosqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    assert "s3cr3t" not in mask_url("redis://a:b@c:s3cr3t@h/0")


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
