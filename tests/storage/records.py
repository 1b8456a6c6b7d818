"""Canonical records the storage tests write."""

from __future__ import annotations

from gateway.model import Event
from gateway.pipeline import now_ms


def event(n: int, **overrides: object) -> Event:
    """Event number `n` of project shop (insert id `id-<n>`, property n)."""
    fields: dict = dict(
        project="shop", source="cohorly", name="e", distinct_id="u", time=1_700_000_000_000 + n,
        received_at=now_ms(), insert_id=f"id-{n}", properties={"n": n},
    )
    fields.update(overrides)
    return Event(**fields)
