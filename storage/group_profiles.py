"""Group profiles (GroupUpdate records) inside the identity/profile transaction.

A group is keyed by (group_key, group_id) within its project and never
resolves through an alias. Its verbs are a person profile's (storage.profiles
applies them), under the same size cap, with the same rejections when an
update is refused or a key has the wrong type for its verb. As with person
profiles, the groups a transaction names are read up front in one query per
project and chunk, updates apply in arrival order against that cache, and
the rows are written once at the end: one upsert, one DELETE per chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, tuple_

from gateway.model import GroupUpdate, ProfileUpdate, Rejection
from storage import tables
from storage.groups import chunks, clean
from storage.profiles import Profile

if TYPE_CHECKING:
    from storage.transaction import Transaction

# (project, group_key, group_id)
GroupKey = tuple[str, str, str]


def key_of(update_: GroupUpdate) -> GroupKey:
    return (update_.project, clean(update_.group_key), clean(update_.group_id))


def _verbs(update_: GroupUpdate) -> ProfileUpdate:
    """The update's verbs in the shape storage.profiles applies (a group has
    no $add or $append)."""
    return ProfileUpdate(
        project=update_.project, source=update_.source, distinct_id=update_.group_id, time=update_.time,
        set_once=update_.set_once, set=update_.set, union=update_.union, remove=update_.remove,
        unset=update_.unset,
    )


def _changes(update_: GroupUpdate) -> bool:
    return bool(update_.set_once or update_.set or update_.union or update_.remove or update_.unset)


class GroupProfiles:
    """The group work of one transaction (`tx`): its cache and its writes."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self._groups: dict[GroupKey, dict[str, Any] | None] = {}  # None: no such group
        self._loaded: set[GroupKey] = set()  # rows that exist in the table
        self._dirty: set[GroupKey] = set()
        self._sized: dict[GroupKey, Profile] = {}

    async def prefetch(self, wanted: dict[str, set[tuple[str, str]]]) -> None:
        """Read the groups named, per project: (group_key, group_id) pairs."""
        g = tables.groups
        for project, pairs in sorted(wanted.items()):
            for chunk in chunks(sorted(pairs)):
                rows = await self.tx.conn.execute(
                    select(g.c.group_key, g.c.group_id, g.c.properties).where(
                        g.c.project == project, tuple_(g.c.group_key, g.c.group_id).in_(list(chunk))
                    )
                )
                found = {(k, i): props for k, i, props in rows.all()}
                for pair in chunk:
                    key = (project, *pair)
                    props = found.get(pair)
                    self._groups[key] = props
                    if props is not None:
                        self._loaded.add(key)

    async def _group(self, key: GroupKey) -> dict[str, Any] | None:
        if key not in self._groups:
            await self.prefetch({key[0]: {(key[1], key[2])}})
        return self._groups[key]

    async def apply(self, update_: GroupUpdate) -> None:
        key = key_of(update_)
        current = await self._group(key)
        if current is None and (update_.delete or not _changes(update_)):
            return
        if update_.delete:
            self._groups[key] = None
            self._dirty.add(key)
            return
        profile = self._sized.get(key)
        if profile is None or profile.props is not current:
            profile = self._sized[key] = Profile(current if current is not None else {})
        problems, refused = profile.apply(_verbs(update_), self.tx.max_profile_bytes)
        named = f"group {update_.group_key}/{update_.group_id}"
        if refused is None:
            self._groups[key] = profile.props
            self._dirty.add(key)
        else:
            self._reject(update_, "profile_too_large",
                         f"{named}: the update would make the profile {refused} bytes, "
                         f"over the limit of {self.tx.max_profile_bytes}; not applied")
        await self.tx.breathe()
        for problem in problems:
            self._reject(update_, "profile_type_mismatch", f"{named}: {problem}")

    def _reject(self, update_: GroupUpdate, reason: str, detail: str) -> None:
        self.tx.rejections.append(
            Rejection(project=update_.project, source=update_.source, reason=reason, detail=detail,
                      received_at=update_.time)
        )

    async def save(self) -> None:
        """One upsert for the groups created or changed (a new row gets
        created_at, an existing one keeps its own), a DELETE per project and
        chunk for those deleted; sorted, so rows are taken in one order."""
        now = self.tx.now
        upserts: list[dict[str, Any]] = []
        deletes: dict[str, list[tuple[str, str]]] = {}
        for key in sorted(self._dirty):
            project, group_key, group_id = key
            props = self._groups[key]
            if props is not None:
                upserts.append({
                    "project": project, "group_key": group_key, "group_id": group_id,
                    "properties": props, "created_at": now, "updated_at": now,
                })
            elif key in self._loaded:
                deletes.setdefault(project, []).append((group_key, group_id))
            # else: created and deleted within this transaction, no row to touch.
        g = tables.groups
        for project, pairs in deletes.items():
            for chunk in chunks(pairs):
                await self.tx.conn.execute(
                    delete(g).where(g.c.project == project, tuple_(g.c.group_key, g.c.group_id).in_(list(chunk)))
                )
        if upserts:
            await self.tx.upsert(g, upserts, ("project", "group_key", "group_id"), keep=("created_at",))
