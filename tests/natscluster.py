"""A three-node NATS JetStream cluster of real `nats-server` processes on
loopback ports, for the tests and the benchmark.

Each node gets a generated config file (client, route and monitoring ports,
its own store directory, the cluster's name and routes to the others), runs
in its own process group, and can be killed with SIGKILL and restarted on the
same ports and store. Readiness is read from the nodes' monitoring endpoints
(/healthz, /jsz), so this module needs no NATS client.

    with NatsCluster(tmp_path) as cluster:     # started, meta leader elected
        cluster.servers                        # ["nats://127.0.0.1:...", ...]
        cluster.kill9(1); cluster.restart(1)   # waits until it is current again
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any


def nats_binary() -> str | None:
    """Debian installs it under /usr/sbin, which a user's PATH may lack."""
    found = shutil.which("nats-server")
    if found is None and os.access("/usr/sbin/nats-server", os.X_OK):
        found = "/usr/sbin/nats-server"
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NatsNode:
    """One `nats-server -js` of a cluster (tests/natsserver.py starts lone ones)."""

    def __init__(self, workdir: Path, name: str, cluster: str, ports: list[int], routes: list[int]) -> None:
        self.name = name
        self.port, self.cluster_port, self.http_port = ports
        self.store = workdir / f"{name}-store"
        self.config = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        listed = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        cluster_block = (f'cluster {{\n  name: "{cluster}"\n  listen: "127.0.0.1:{self.cluster_port}"\n'
                         f"  routes: [{listed}]\n}}\n")
        self.config.write_text(
            f'server_name: "{name}"\nlisten: "127.0.0.1:{self.port}"\nhttp: "127.0.0.1:{self.http_port}"\n'
            f'jetstream {{\n  store_dir: "{self.store}"\n}}\n' + cluster_block,
            encoding="utf-8",
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (Debian: apt-get install nats-server)")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill9(self) -> None:
        """SIGKILL, as a crash: no flush, no leaving the cluster."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill9()

    def monitor(self, path: str) -> tuple[int, Any]:
        """(status, JSON body) of a monitoring endpoint; (0, None) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def meta_leader(self) -> str:
        """The JetStream meta leader this node knows of ("" while there is none)."""
        status, body = self.monitor("/jsz")
        if status != 200 or not isinstance(body, dict):
            return ""
        return str((body.get("meta_cluster") or {}).get("leader") or "")

    def healthy(self) -> bool:
        """JetStream up and, in a cluster, current with the meta group and its streams."""
        return self.monitor("/healthz")[0] == 200

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class NatsCluster:
    """`size` JetStream nodes routed to each other on loopback ports."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = f"dgtest-{uuid.uuid4().hex[:8]}"
        ports = free_ports(3 * size)
        groups = [ports[3 * i : 3 * i + 3] for i in range(size)]
        self.nodes = [
            NatsNode(workdir, f"n{i + 1}", self.name, groups[i], [g[1] for j, g in enumerate(groups) if j != i])
            for i in range(size)
        ]

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30) -> float:
        """Until every running node is healthy and agrees on one meta leader
        that is itself running; returns the seconds it took."""
        started = time.monotonic()
        while True:
            running = [n for n in self.nodes if n.alive]
            leaders = {n.meta_leader() for n in running}
            names = {n.name for n in running}
            if len(leaders) == 1 and leaders <= names and all(n.healthy() for n in running):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                tails = "\n".join(f"--- {n.name} (alive={n.alive})\n{n.log_tail(1500)}" for n in self.nodes)
                raise RuntimeError(f"JetStream cluster not ready after {timeout} s (leaders seen {leaders})\n"
                                   + tails)
            time.sleep(0.1)

    def kill9(self, index: int) -> None:
        self.nodes[index].kill9()

    def restart(self, index: int, timeout: float = 30) -> float:
        """Start a killed node again on its ports and store; returns the
        seconds until the cluster (that node included) is ready again."""
        node = self.nodes[index]
        assert not node.alive, f"{node.name} is still running"
        node.start()
        return self.wait_ready(timeout)

    def _stream_details(self, stream: str) -> list[tuple[NatsNode, dict[str, Any]]]:
        """Each running node's view of `stream` (with its consumers)."""
        found = []
        for node in self.nodes:
            if not node.alive:
                continue
            status, body = node.monitor("/jsz?accounts=true&streams=true&consumers=true")
            if status != 200 or not isinstance(body, dict):
                continue
            for account in body.get("account_details") or []:
                found += [(node, d) for d in account.get("stream_detail") or [] if d.get("name") == stream]
        return found

    def stream_leader(self, stream: str) -> int | None:
        """Index of the node leading `stream`'s replica group, if one does."""
        names = [n.name for n in self.nodes]
        for _, detail in self._stream_details(stream):
            leader = (detail.get("cluster") or {}).get("leader")
            if leader in names:
                return names.index(leader)
        return None

    def consumer(self, stream: str, name: str) -> dict[str, Any] | None:
        """The consumer's state (num_ack_pending, num_pending, ...) as the
        leader of its own replica group reports it."""
        for node, detail in self._stream_details(stream):
            for consumer in detail.get("consumer_detail") or []:
                if consumer.get("name") == name and (consumer.get("cluster") or {}).get("leader") in (node.name, None):
                    return dict(consumer)
        return None

    def stop(self) -> None:
        """Always safe, whatever state the nodes are in."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
