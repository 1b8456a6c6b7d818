"""Device registrations of one transaction: queued, then written at its end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.model import Device
from storage import tables
from storage.groups import clean

if TYPE_CHECKING:
    from storage.transaction import Transaction


class Devices:
    def __init__(self, now: int) -> None:
        self.now = now
        # (project, device id) -> the row to upsert at the end of the transaction.
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, record: Device) -> None:
        """Queue a registration; `save` writes them all at the end."""
        device_id = clean(record.device_id)
        values: dict[str, Any] = {
            "project": record.project,
            "device_id": device_id,
            "distinct_id": clean(record.distinct_id),
            "source": record.source,
            "push_token": clean(record.push_token),
            "os": clean(record.os),
            "os_version": clean(record.os_version),
            "model": clean(record.model),
            "app_build": clean(record.app_build),
            "app_version": clean(record.app_version),
            "updated_at": self.now,
        }
        # Keyed by device: the last registration in the group wins, as when
        # each was its own upsert (and one PostgreSQL upsert statement may not
        # update the same row twice).
        self._rows[(record.project, device_id)] = values

    async def save(self, tx: Transaction) -> None:
        rows = [self._rows[k] for k in sorted(self._rows)]
        if rows:
            await tx.upsert(tables.devices, rows, ("project", "device_id"))
