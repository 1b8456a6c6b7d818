"""The storage tests' sink: the backend's database migrated, a database
sink started on it (default options), closed after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage.engine import create_engine
from storage.migrate import upgrade
from storage.sink import Sink
from tests.support import database_sink


@pytest.fixture
async def store(backend) -> AsyncIterator[tuple[Any, Sink]]:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine)
    sink.start()
    try:
        yield engine, sink
    finally:
        await sink.close()
        await engine.dispose()
