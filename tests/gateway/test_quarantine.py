"""gateway.quarantine.Sampler: at most `per_minute` rejections kept per
(project, source, reason) and minute, and excerpts cut to a size in bytes
without splitting a character."""

from __future__ import annotations

import time

import pytest

from gateway.model import Rejection
from gateway.quarantine import Sampler
from tests.support import gateway, rejections_of, settings_for

pytestmark = pytest.mark.anyio


def _rejection(project: str | None = "shop", source: str = "collect", reason: str = "invalid",
               excerpt: str = "") -> Rejection:
    return Rejection(project=project, source=source, reason=reason, detail="d", excerpt=excerpt)


def _admitted_within_one_minute(sampler: Sampler, rejections: list[Rejection]) -> list[bool]:
    """`admit` of each, all in one clock minute (tried again if it turned)."""
    while True:
        minute = int(time.time() // 60)
        admitted = [sampler.admit(r) for r in rejections]
        if int(time.time() // 60) == minute:
            return admitted
        sampler = Sampler(sampler._per_minute, sampler._excerpt)


def test_at_most_per_minute_are_kept_per_project_source_and_reason() -> None:
    keys = [_rejection(), _rejection(project="blog"), _rejection(source="cohorly"),
            _rejection(reason="too_deep"), _rejection(project=None)]
    admitted = _admitted_within_one_minute(Sampler(3, 100), keys * 5)
    per_key = [admitted[n::len(keys)] for n in range(len(keys))]
    assert per_key == [[True, True, True, False, False]] * len(keys)


def test_at_least_one_a_minute_is_kept() -> None:
    assert _admitted_within_one_minute(Sampler(0, 100), [_rejection()] * 3) == [True, False, False]


def test_a_new_minute_starts_a_new_count(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = Sampler(1, 100)
    now = 1_800_000_000.0
    monkeypatch.setattr(time, "time", lambda: now)
    assert [sampler.admit(_rejection()) for _ in range(2)] == [True, False]
    now += 60
    assert [sampler.admit(_rejection()) for _ in range(2)] == [True, False]


def test_an_excerpt_is_cut_to_its_size_in_utf8_bytes_never_inside_a_character() -> None:
    sampler = Sampler(10, 10)
    short = _rejection(excerpt="abc")
    assert sampler.bound(short) is short
    assert sampler.bound(_rejection(excerpt="x" * 25)).excerpt == "x" * 10
    assert sampler.bound(_rejection(excerpt="é" * 6)).excerpt == "é" * 5  # 12 bytes -> 10
    assert sampler.bound(_rejection(excerpt="ab" + "€" * 4)).excerpt == "ab" + "€" * 2  # 8 of 10 bytes
    exact = _rejection(excerpt="é" * 5)
    assert sampler.bound(exact) is exact
    cut = sampler.bound(_rejection(excerpt="x" * 25))
    assert (cut.project, cut.source, cut.reason, cut.detail) == ("shop", "collect", "invalid", "d")


async def test_the_gateway_stores_at_most_per_minute_of_a_flood(sqlite_backend: dict[str, str]) -> None:
    settings = settings_for(sqlite_backend, quarantine={"per_minute": 2, "excerpt_bytes": 16})
    collect = {"tc_s": "1234", "token": "src_shop"}
    async with gateway(settings) as client:
        # Collect stores the good event and quarantines the other (an id
        # over 1 KB) with it, before answering 200.
        for n in range(6):
            batch = {"batch": [{"event_name": "bad", "user": {"id": "x" * 2000 + str(n)}},
                               {"event_name": "ok", "user": {"id": "p"}}]}
            reply = await client.post("/events/batch", params=collect, json=batch)
            assert reply.status_code == 200, reply.text
        stored = await rejections_of(client)
    # Two a minute: the clock may turn once during the loop.
    assert 2 <= len(stored) <= 4
    assert {r["reason"] for r in stored} == {"id_too_long"}
    assert all(0 < len(r["excerpt"].encode()) <= 16 for r in stored)
