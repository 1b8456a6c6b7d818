"""Person profiles (ProfileUpdate records) inside the identity/profile transaction.

A profile belongs to the person an id resolves to (through its alias link).
The profiles a transaction names are read up front in one query per project
and chunk of persons (`prefetch`, once the links are known), updates apply in
arrival order against that cache, and the rows are written once at the end:
one upsert, one DELETE per project and chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import delete, select

from gateway.model import ProfileUpdate, Rejection
from storage import tables
from storage.engine import json_text
from storage.groups import chunks, clean, is_noop
from storage.profiles import Profile
from storage.sql import PG_PROFILES, PG_PROFILES_UPSERT

if TYPE_CHECKING:
    from storage.transaction import Transaction


class PersonProfiles:
    """The person-profile work of one transaction (`tx`): its cache and its writes."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self._profiles: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._loaded: set[tuple[str, str]] = set()  # rows that exist in the table
        self._dirty: set[tuple[str, str]] = set()
        # The profiles updates were applied to, their sizes kept (same dicts
        # as in `_profiles`).
        self._sized: dict[tuple[str, str], Profile] = {}

    async def prefetch(self, project: str, persons: Sequence[str]) -> None:
        """Read the profiles of `persons` (sorted), a query per chunk."""
        for chunk in chunks(persons):
            profiles = await self._profiles_of(project, chunk)
            for person in chunk:
                self._profiles[(project, person)] = profiles.get(person)  # None: no profile
                if person in profiles:
                    self._loaded.add((project, person))

    async def _profiles_of(self, project: str, persons: Sequence[str]) -> dict[str, dict[str, Any]]:
        tx = self.tx
        if tx.straight():
            rows = await tx.driver.fetch(PG_PROFILES, project, persons)
            return {person: msgspec.json.decode(props) for person, props in rows}
        p = tables.profiles
        result = await tx.conn.execute(
            select(p.c.distinct_id, p.c.properties).where(
                p.c.project == project, tx.among(p.c.distinct_id, persons)
            )
        )
        return dict(result.all())

    async def get(self, project: str, person: str) -> dict[str, Any] | None:
        """The person's profile, None if there is none; read if not cached."""
        key = (project, person)
        if key not in self._profiles:
            p = tables.profiles
            row = await self.tx.conn.execute(
                select(p.c.properties).where(p.c.project == project, p.c.distinct_id == person)
            )
            props = row.scalar()
            self._profiles[key] = props
            if props is not None:
                self._loaded.add(key)
        return self._profiles[key]

    def put(self, project: str, person: str, props: dict[str, Any] | None) -> None:
        """Set (None: delete) the person's profile, written by `save`."""
        self._profiles[(project, person)] = props
        self._dirty.add((project, person))

    async def apply(self, update_: ProfileUpdate) -> None:
        tx = self.tx
        person = await tx.resolve(update_.project, clean(update_.distinct_id))
        current = await self.get(update_.project, person)
        if current is None and (update_.delete or is_noop(update_)):
            return
        key = (update_.project, person)
        if update_.delete:
            self.put(update_.project, person, None)
            return
        profile = self._sized.get(key)
        if profile is None or profile.props is not current:
            profile = self._sized[key] = Profile(current if current is not None else {})
        problems, refused = profile.apply(update_, tx.max_profile_bytes)
        if refused is None:
            self.put(update_.project, person, profile.props)
        else:
            tx.rejections.append(
                Rejection(
                    project=update_.project,
                    source=update_.source,
                    reason="profile_too_large",
                    detail=f"{update_.distinct_id}: the update would make the profile {refused} bytes, "
                    f"over the limit of {tx.max_profile_bytes}; not applied",
                    received_at=update_.time,
                )
            )
        await tx.breathe()
        for problem in problems:
            tx.rejections.append(
                Rejection(
                    project=update_.project,
                    source=update_.source,
                    reason="profile_type_mismatch",
                    detail=f"{update_.distinct_id}: {problem}",
                    received_at=update_.time,
                )
            )

    async def save(self) -> None:
        """One upsert for the profiles created or changed (a new row gets
        created_at, an existing one keeps its own), one DELETE for those
        deleted; sorted, so that rows are always taken in the same order."""
        tx = self.tx
        upserts: list[dict[str, Any]] = []
        deletes: dict[str, list[str]] = {}
        for project, person in sorted(self._dirty):
            props = self._profiles[(project, person)]
            if props is not None:
                upserts.append(
                    {
                        "project": project, "distinct_id": person, "properties": props,
                        "created_at": tx.now, "updated_at": tx.now,
                    }
                )
            elif (project, person) in self._loaded:
                deletes.setdefault(project, []).append(person)
            # else: created and deleted within this transaction, no row to touch.
        p = tables.profiles
        for project, persons in deletes.items():
            for chunk in chunks(persons):
                await tx.conn.execute(
                    delete(p).where(p.c.project == project, tx.among(p.c.distinct_id, chunk))
                )
        if upserts and tx.straight():
            for rows in chunks(upserts):
                await tx.driver.execute(PG_PROFILES_UPSERT, json_text(rows))
        elif upserts:
            await tx.upsert(p, upserts, ("project", "distinct_id"), keep=("created_at",))
