"""open_sink: the store the URL names, the lanes it may have."""

from __future__ import annotations

import pytest

from storage.engine import create_engine
from storage.factory import open_sink
from storage.postgres import PostgresStore
from storage.sink import SinkKind, SinkOptions
from storage.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


async def test_the_url_picks_the_store_and_sqlite_keeps_one_lane(tmp_path) -> None:
    engines = [create_engine(f"sqlite+aiosqlite:///{tmp_path}/d.db"),
               create_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")]
    try:
        sqlite, postgres = (open_sink(SinkKind.DATABASE, e, SinkOptions(lanes=4, keep_days=3), clock=lambda: 0)
                            for e in engines)
        assert isinstance(sqlite._store, SqliteStore) and sqlite._store.lanes == 1  # type: ignore[attr-defined]
        assert isinstance(postgres._store, PostgresStore) and postgres._store.lanes == 4  # type: ignore[attr-defined]
        assert sqlite._expiry is not None  # type: ignore[attr-defined]
        unkept = open_sink(SinkKind.DATABASE, engines[0], SinkOptions(keep_days=0), clock=lambda: 0)
        assert unkept._expiry is None  # type: ignore[attr-defined]
        await sqlite._store.close()  # type: ignore[attr-defined]
        await unkept._store.close()  # type: ignore[attr-defined]
    finally:
        for engine in engines:
            await engine.dispose()
    assert [k.value for k in SinkKind] == ["database", "jetstream"]  # `[sink] kind` takes these


def test_jetstream_kind_opens_the_stream_sink(tmp_path) -> None:
    from storage.jetstream import StreamSink
    from storage.sink import StreamOptions

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/d.db")
    options = SinkOptions(stream=StreamOptions(stream="s1", replicas=3))
    sink = open_sink(SinkKind.JETSTREAM, engine, options, clock=lambda: 0)
    assert isinstance(sink, StreamSink)
    assert sink._options.stream == "s1" and sink._options.replicas == 3
