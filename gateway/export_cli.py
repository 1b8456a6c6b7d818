"""`dialgate export`: a project's events, profiles, aliases or groups to a
file or stdout, with a progress bar when stderr is a terminal.

A file is written beside its final name and renamed into place once
complete, so a failed export never leaves a file that looks whole; on stdout
a failure is the exit status (1) and a line on stderr. Exit 2: bad
arguments, unknown project, missing extra, unwritable output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.export import Format
    from storage.export import Kind, Span

# storage.export.Kind and gateway.export.Format (a test checks): the parser
# is built for every command, the database layer imported for this one only.
KINDS = ("events", "profiles", "aliases", "groups")
FORMATS = ("ndjson", "csv", "parquet")


def add_parser(sub: Any, config_option: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser("export", help="write a project's events, profiles, aliases or groups out")
    config_option(parser)
    parser.add_argument("--project", required=True, help="the project (a [[projects]] name)")
    parser.add_argument("--kind", choices=KINDS, default="events")
    parser.add_argument("--format", choices=FORMATS, default="ndjson")
    parser.add_argument("--since", help="events whose time is at or after T (ISO 8601, or epoch ms)")
    parser.add_argument("--until", help="events whose time is before T (ISO 8601, or epoch ms)")
    parser.add_argument("--output", "-o", default="-", help="FILE, or - for stdout (default)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.export import Format, MissingExtra, check_format
    from gateway.timespan import span_of
    from storage.export import Kind

    kind, fmt = Kind(args.kind), Format(args.format)
    try:
        span = span_of(args.since, args.until)
        if kind is not Kind.EVENTS and not span.open:
            raise ValueError("--since/--until select events by their time; profiles, aliases and groups "
                             "are exported whole")
        if args.project not in {p.name for p in settings.projects}:
            raise ValueError(f"unknown project {args.project!r}")
        check_format(fmt)
    except (ValueError, MissingExtra) as exc:
        return _fail(str(exc), 2)
    try:
        with _output(args.output) as out:
            asyncio.run(_export(settings.storage.url, args.project, kind, fmt, out, span))
    except _Unwritable as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        return _fail(f"export failed, nothing complete was written: {type(exc).__name__}: {exc}", 1)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"dialgate: {message}", file=sys.stderr)
    return status


async def _export(url: str, project: str, kind: Kind, fmt: Format, out: BinaryIO, span: Span) -> int:
    from gateway.export import export
    from storage.engine import create_engine
    from storage.export import count

    engine = create_engine(url)
    try:
        bar = None
        if sys.stderr.isatty():
            bar = Progress(sys.stderr, await count(engine, project, kind, span), kind.value)
        written = await export(engine, project, kind, fmt, out, span, progress=bar)
        out.flush()
        if bar is not None:
            bar.finish(written)
        return written
    finally:
        await engine.dispose()


class _Unwritable(Exception):
    pass


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdout.buffer
        return
    if os.path.exists(path) and not os.path.isfile(path):
        # A device, FIFO or socket (/dev/null, /dev/stdout): written in place;
        # renaming a file onto it would replace the device with that file.
        try:
            special = open(path, "wb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise _Unwritable(f"cannot write {path}: {exc.strerror or exc}") from None
        with special:
            yield special
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (renamed or removed below)
            dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial", delete=False)
    except OSError as exc:
        raise _Unwritable(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with handle:
            yield handle  # type: ignore[misc]
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


class Progress:
    """One line on a terminal, redrawn at most ten times a second:
    `events [#######-------]  45%  45,000/100,000  61,234/s`."""

    WIDTH = 30

    def __init__(self, stream: TextIO, total: int, label: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream, self._total, self._label, self._clock = stream, total, label, clock
        self._start = self._last = clock()
        self._draw(0)

    def __call__(self, done: int) -> None:
        now = self._clock()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(done)

    def finish(self, done: int) -> None:
        self._draw(done, final=True)
        elapsed = max(self._clock() - self._start, 1e-9)
        self._stream.write(f"\nexported {done:,} {self._label} in {elapsed:.1f} s\n")
        self._stream.flush()

    def _draw(self, done: int, *, final: bool = False) -> None:
        # The count was taken before the export's snapshot: rows written
        # between the two may carry it past the total.
        total = max(self._total, done)
        share = 1.0 if final or total == 0 else done / total
        filled = round(share * self.WIDTH)
        rate = done / max(self._clock() - self._start, 1e-9)
        self._stream.write(f"\r{self._label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {share:4.0%}  "
                           f"{done:,}/{total:,}  {rate:,.0f}/s")
        self._stream.flush()
