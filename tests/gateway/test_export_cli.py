"""`dialgate export`: its arguments and errors, the progress bar on a
terminal (and silence elsewhere), the missing Parquet extra."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.export import Format
from gateway.export_cli import FORMATS, KINDS, Progress
from storage.export import Kind
from tests.export_support import ROOT, config_file, run_cli, seed

pytestmark = pytest.mark.anyio


def test_the_parser_offers_every_kind_and_format() -> None:
    assert tuple(k.value for k in Kind) == KINDS
    assert tuple(f.value for f in Format) == FORMATS


@pytest.mark.parametrize(("args", "message"), [
    (["--project", "nope"], "unknown project 'nope'"),
    (["--project", "shop", "--since", "soon"], "since must be epoch milliseconds or an ISO 8601"),
    (["--project", "shop", "--since", "2026-12-06", "--until", "2026-12-05"], "until must be after since"),
    (["--project", "shop", "--kind", "profiles", "--until", "5"], "--since/--until select events"),
    (["--project", "shop", "-o", "/nonexistent-dir/out.ndjson"], "cannot write /nonexistent-dir/out.ndjson"),
])
def test_bad_arguments_exit_2_with_a_clear_line(sqlite_backend, tmp_path: Path, capsys, args, message) -> None:
    config = config_file(tmp_path, sqlite_backend)
    assert main(["export", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dialgate: ") and message in err
    assert os.listdir(tmp_path) == ["dialgate.toml"]  # the database was not even opened


def test_a_missing_parquet_extra_is_named(sqlite_backend, tmp_path: Path) -> None:
    config = config_file(tmp_path, sqlite_backend)
    # pyarrow made unimportable in that process, as when it is not installed.
    code = ("import sys; sys.modules['pyarrow'] = None; from gateway.cli import main; "
            f"sys.exit(main(['export', '--config', {str(config)!r}, '--project', 'shop', '--format', 'parquet']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, check=False)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == ("dialgate: --format parquet needs pyarrow: "
                                            "pip install 'dialgate[parquet]'")
    assert done.stdout == b""


async def test_a_progress_bar_on_a_terminal_only(sqlite_backend, tmp_path: Path) -> None:
    await seed(sqlite_backend["storage_url"], 2500)
    config = config_file(tmp_path, sqlite_backend)
    out = tmp_path / "out.ndjson"
    screen = _on_a_terminal(["export", "--config", str(config), "--project", "shop", "-o", str(out)])
    assert "\revents [" in screen and "100%" in screen and "2,500/2,500" in screen
    assert "exported 2,500 events in " in screen
    assert len(out.read_bytes().splitlines()) == 2500
    status, _, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "-o", str(out))
    assert status == 0 and err == b""


def _on_a_terminal(args: list[str]) -> str:
    """Run dialgate with stderr on a pseudo-terminal; what it showed there."""
    main_fd, child_fd = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stderr=child_fd,
                          stdout=subprocess.DEVNULL, cwd=ROOT) as process:
        os.close(child_fd)
        shown = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0, shown
    os.close(main_fd)
    return shown.decode()


def test_the_bar_redraws_at_most_ten_times_a_second() -> None:
    now = [0.0]
    screen = io.StringIO()
    bar = Progress(screen, 1000, "events", clock=lambda: now[0])
    for done in range(0, 1000, 100):
        now[0] += 0.01
        bar(done)
    assert screen.getvalue().count("\r") == 1  # the first draw only
    now[0] += 0.2
    bar(500)
    assert screen.getvalue().endswith("\revents [###############---------------]  50%  500/1,000  1,667/s")
    bar.finish(1200)  # rows written after the count: the total follows
    assert "[##############################] 100%  1,200/1,200" in screen.getvalue()
    assert screen.getvalue().endswith("\nexported 1,200 events in 0.3 s\n")


def test_a_special_file_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    # `--output /dev/null` once replaced the device with a regular file (the
    # rename into place); a FIFO stands in for the device here.
    import os
    import stat
    import threading

    from gateway.export_cli import _output

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    with _output(str(fifo)) as out:
        out.write(b'{"a":1}\n')
    reader.join(5)
    assert received == [b'{"a":1}\n']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_regular_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    from gateway.export_cli import _output

    target = tmp_path / "out.ndjson"
    with pytest.raises(RuntimeError), _output(str(target)) as out:
        out.write(b"half")
        raise RuntimeError("cut")
    assert list(tmp_path.iterdir()) == []
    with _output(str(target)) as out:
        out.write(b"whole\n")
    assert target.read_bytes() == b"whole\n"
