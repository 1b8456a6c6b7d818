"""Erasure of a person (`DELETE /admin/v1/projects/{p}/people/{id}` and
`dialgate erase`): storage.erase deletes the rows, then the erased events'
insert ids leave the dedup cache, so that the cache never answers
"duplicate" for an event the database no longer holds."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.dedup import Dedup, Key
from storage.erase import erase

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from gateway.config import Settings

# How the receipt says what became of the erased insert ids in the cache.
FORGOTTEN = "forgotten"
UNREACHABLE = "redis unreachable: a copy re-sent within redis.dedup_ttl_seconds is taken for a duplicate"
LOCAL_ONLY = ("no redis: forgotten by this process only; other workers' in-process caches keep them "
              "until they age out")
OUT_OF_REACH = ("no redis: the running workers' in-process caches keep them until they age out (a copy re-sent "
                "meanwhile is taken for a duplicate)")


async def erase_person(engine: AsyncEngine, dedup: Dedup | None, project: str, id_: str, *,
                       shared: bool) -> dict[str, Any]:
    """Erase, forget the insert ids (`shared`: the cache is Redis, which
    every worker asks; None: no cache in reach), and the receipt."""
    receipt = await erase(engine, project, id_)
    keys: list[Key] = [(project, source, insert_id) for source, insert_id in receipt.insert_ids]
    shown = receipt.shown()
    if dedup is None:
        shown["dedup_cache"] = OUT_OF_REACH
    elif not await dedup.forget(keys):
        shown["dedup_cache"] = UNREACHABLE
    else:
        shown["dedup_cache"] = FORGOTTEN if shared else LOCAL_ONLY
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, help="the project's name")
    parser.add_argument("--id", required=True, dest="person_id", help="any id of the person")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.redislink import RedisLink
    from storage.engine import create_engine

    project, id_ = args.project, args.person_id
    if not id_:
        print("dialgate: erase: --id must not be empty", file=sys.stderr)
        return 2
    if project not in {p.name for p in settings.projects}:
        print(f"dialgate: erase: note: project {project!r} is not in the configuration; erasing its rows anyway",
              file=sys.stderr)
    engine = create_engine(settings.storage.url)
    link = None
    if settings.redis.url:
        link = RedisLink(settings.redis.url, prefix=settings.redis.key_prefix,
                         retry_interval=settings.redis.retry_interval)
    dedup = Dedup(link, settings.redis.dedup_ttl_seconds, 1) if link is not None else None
    try:
        shown = await erase_person(engine, dedup, project, id_, shared=link is not None)
    finally:
        if link is not None:
            await link.close()
        await engine.dispose()
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(shown), indent=2).decode() + "\n")
    return 0
