"""Device registrations through the sink, both backends: the last
registration of a device in a group wins, a device id seen before moves to
the person who registered it last, NUL is stored as U+FFFD."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from gateway.model import Device
from storage import tables

pytestmark = pytest.mark.anyio


def _device(person: str, os: str = "iOS", device_id: str = "d1") -> Device:
    return Device(project="shop", source="client", distinct_id=person, device_id=device_id, os=os, model="x")


async def _rows(engine: Any) -> list[tuple[str, str, str | None]]:
    d = tables.devices
    async with engine.connect() as conn:
        result = await conn.execute(sa.select(d.c.device_id, d.c.distinct_id, d.c.os).order_by(d.c.device_id))
        return [tuple(row) for row in result]


async def test_the_last_registration_in_a_group_wins(store) -> None:
    engine, sink = store
    await sink.submit([_device("anna", "iOS"), _device("anna", "Android"), _device("bob", "iPadOS", "d2")])
    assert await _rows(engine) == [("d1", "anna", "Android"), ("d2", "bob", "iPadOS")]


async def test_a_device_moves_to_whoever_registered_it_last(store) -> None:
    engine, sink = store
    await sink.submit([_device("anna")])
    await sink.submit([_device("bob\x00")])
    assert await _rows(engine) == [("d1", "bob\ufffd", "iOS")]
