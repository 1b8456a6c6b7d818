"""Real nats-server processes for the tests: one server, or a cluster on
loopback ports, each with a store directory of its own.

    with NatsServer(tmp_path) as server:      # -js on a free port
        url = server.url
    with NatsCluster(tmp_path, size=3) as cluster:
        cluster.urls; cluster.kill(1); cluster.start(1)

A test skips when the binary is missing (fails under CI=true), as the
PostgreSQL and Redis fixtures do.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.conftest import unreachable

BINARY = os.environ.get("DIALGATE_TEST_NATS_SERVER", "nats-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout} s")


class NatsServer:
    """One nats-server with JetStream, on a free loopback port (kept across
    restarts), its store under `root`. `routes`/`cluster_port`: a member of
    a cluster (NatsCluster sets them)."""

    def __init__(self, root: Path, *, name: str = "n0", port: int | None = None,
                 cluster_port: int | None = None, routes: tuple[int, ...] = ()) -> None:
        if shutil.which(BINARY) is None:
            unreachable("nats-server", f"no {BINARY!r} on PATH (Debian package nats-server)")
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.store = root / f"nats-{name}"
        self.store.mkdir(parents=True, exist_ok=True)
        self.log = root / f"nats-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [BINARY, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store),
                "-n", self.name, "-l", str(self.log)]
        if self.cluster_port is not None:
            argv += ["--cluster_name", "dialgate", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return argv

    def start(self) -> NatsServer:
        self.process = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.process)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class NatsCluster:
    """`size` JetStream servers routed to each other on loopback ports."""

    def __init__(self, root: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(root, name=f"n{i}", cluster_port=cluster_ports[i],
                       routes=tuple(p for j, p in enumerate(cluster_ports) if j != i))
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, index: int | None = None) -> NatsCluster:
        for i, server in enumerate(self.servers):
            if index is None or i == index:
                server.start()
        return self

    def kill(self, index: int) -> None:
        self.servers[index].kill()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
