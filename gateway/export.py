"""Export formats: NDJSON, CSV and Parquet writers over storage.export batches.

Every format holds the same records with the same columns
(`storage.export.COLUMNS`): NDJSON one JSON object a line, exactly the
admin API's shapes; CSV a header row, then one row a record, nested values
(properties, context, ids, devices) as JSON text, an empty cell for null,
`true`/`false` for booleans; Parquet one column a field, nested values as
JSON text (strings), numbers as int64 and `consent` as a nullable boolean.
Parquet needs pyarrow, an optional extra (`pip install 'dialgate[parquet]'`).
"""

from __future__ import annotations

import contextlib
import csv
import enum
import io
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO, Protocol

import anyio
import msgspec
from msgspec.structs import astuple
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response, StreamingResponse

from storage.export import COLUMNS, EVERYTHING, Kind, Span, batches

log = logging.getLogger("dialgate")


class Format(enum.Enum):
    NDJSON = "ndjson"
    CSV = "csv"
    PARQUET = "parquet"


class MissingExtra(Exception):
    """A format whose library is not installed."""


class Writer(Protocol):
    def write(self, batch: list[Any]) -> None: ...

    def close(self) -> None:
        """Finish the output (its footer); the underlying file stays open."""


_ENCODER = msgspec.json.Encoder()


def ndjson_lines(batch: list[Any]) -> bytes:
    """The batch as NDJSON: one record a line, each ending in a newline."""
    return _ENCODER.encode_lines(batch)


class NdjsonWriter:
    def __init__(self, kind: Kind, out: BinaryIO) -> None:
        self._kind, self._out = kind, out

    def write(self, batch: list[Any]) -> None:
        self._out.write(ndjson_lines(batch))

    def close(self) -> None:
        pass


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, msgspec.Raw):
        return bytes(value).decode()
    if isinstance(value, list | dict):
        return _ENCODER.encode(value).decode()
    return value


class CsvWriter:
    def __init__(self, kind: Kind, out: BinaryIO) -> None:
        # newline="": the csv module writes its own \r\n line ends (RFC 4180).
        self._text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self._csv = csv.writer(self._text)
        self._csv.writerow(COLUMNS[kind])

    def write(self, batch: list[Any]) -> None:
        self._csv.writerows([[_cell(v) for v in astuple(record)] for record in batch])

    def close(self) -> None:
        self._text.flush()
        self._text.detach()  # leave `out` open: it is the caller's


def _pyarrow() -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise MissingExtra("--format parquet needs pyarrow: pip install 'dialgate[parquet]'") from None
    return pyarrow


_INTEGERS = {"time", "received_at", "created_at"}


def _arrow_type(pa: Any, column: str) -> Any:
    if column in _INTEGERS:
        return pa.int64()
    if column == "consent":
        return pa.bool_()
    return pa.string()


class ParquetWriter:
    # Rows per row group: a couple of MB of typical events, so that the rows
    # waiting for it keep the peak memory low (README: about 120 MB for any
    # size, pyarrow's 50 included).
    GROUP_ROWS = 5_000

    def __init__(self, kind: Kind, out: BinaryIO) -> None:
        self._pa = pa = _pyarrow()
        self._columns = COLUMNS[kind]
        self._schema = pa.schema([pa.field(c, _arrow_type(pa, c)) for c in self._columns])
        self._writer = pa.parquet.ParquetWriter(out, self._schema, compression="zstd")
        self._pending: list[list[Any]] = [[] for _ in self._columns]
        self._rows = 0

    def write(self, batch: list[Any]) -> None:
        for record in batch:
            for values, value in zip(self._pending, astuple(record), strict=True):
                values.append(_parquet_value(value))
        self._rows += len(batch)
        if self._rows >= self.GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            arrays = [self._pa.array(values, type=field.type)
                      for values, field in zip(self._pending, self._schema, strict=True)]
            self._writer.write_batch(self._pa.record_batch(arrays, schema=self._schema))
            self._pending = [[] for _ in self._columns]
            self._rows = 0
            # Give the row group's buffers back: pyarrow's allocator keeps
            # freed memory for reuse, which would grow the peak.
            self._pa.default_memory_pool().release_unused()

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _parquet_value(value: Any) -> Any:
    if isinstance(value, msgspec.Raw):
        return bytes(value).decode()
    if isinstance(value, list | dict):
        return _ENCODER.encode(value).decode()
    return value


WRITERS: dict[Format, Callable[[Kind, BinaryIO], Writer]] = {
    Format.NDJSON: NdjsonWriter,
    Format.CSV: CsvWriter,
    Format.PARQUET: ParquetWriter,
}


def check_format(fmt: Format) -> None:
    """Raise MissingExtra now, before anything is read or written, when the
    format's library is missing."""
    if fmt is Format.PARQUET:
        _pyarrow()


async def export(engine: AsyncEngine, project: str, kind: Kind, fmt: Format, out: BinaryIO,
                 span: Span = EVERYTHING, *, progress: Callable[[int], None] | None = None) -> int:
    """Write every record of `kind` in `span` to `out`; the number written."""
    writer = WRITERS[fmt](kind, out)
    written = 0
    async with contextlib.aclosing(batches(engine, project, kind, span)) as found:
        async for batch in found:
            writer.write(batch)
            written += len(batch)
            if progress is not None:
                progress(written)
    writer.close()
    return written


async def ndjson_response(engine: AsyncEngine, project: str, kind: Kind, span: Span = EVERYTHING) -> Response:
    """The NDJSON export as a streamed answer (`application/x-ndjson`), a
    chunk a batch. The first batch is read before the answer starts, so a
    database that cannot answer then is still an error status (503). A
    failure after that aborts the connection before the final chunk: an
    HTTP client sees a cut body as an error, never as a whole export."""
    found = batches(engine, project, kind, span)
    try:
        first = await anext(found, None)
    except BaseException:
        await found.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield ndjson_lines(first)
            async for batch in found:
                yield ndjson_lines(batch)
        except Exception as exc:
            log.error("export of %s from project %s failed midway (%s): connection aborted",
                      kind.value, project, type(exc).__name__)
            raise
        finally:
            # Shielded: when the client went away the scope is cancelled,
            # and the connection must still go back (or be dropped).
            with anyio.CancelScope(shield=True):
                await found.aclose()

    return StreamingResponse(body(), media_type="application/x-ndjson")
