"""The JetStream fault tests' processes and clients: `dialgate load`
subprocesses, the `[sink]`/`[loader]` config they share with the gateways,
and clients that retry a batch as an SDK does (same batch, same insert ids,
on a 5xx or a connection error, failing over to another gateway)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.faults.harness import ADMIN_KEY, DIALGATE, TOKEN, clean_env, post_batch, stored_counts
from tests.support import free_port


def stream_config(servers: list[str], stream: str, replicas: int = 3) -> str:
    """The `[sink]` and `[loader]` tables (appended to the harness's config).
    Short waits so a crash's consequences show within the test: a killed
    loader's messages come back after `ack_wait_seconds`."""
    listed = ", ".join(f'"{s}"' for s in servers)
    return f"""
[sink]
kind = "jetstream"
servers = [{listed}]
stream = "{stream}"
replicas = {replicas}
duplicate_window_seconds = 120
ack_timeout_seconds = 15

[loader]
batch_max_records = 1000
lease_seconds = 3
ack_wait_seconds = 3
"""


class LoaderProcess:
    """One `dialgate load` in its own process group, with /metrics on a
    port of its own (its readiness)."""

    def __init__(self, config: Path, name: str) -> None:
        self.config = config
        self.name = name
        self.metrics = f"127.0.0.1:{free_port()}"
        self.err = config.parent / f"{name}.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self, timeout: float = 30) -> LoaderProcess:
        args = [str(DIALGATE), "load", "--config", str(self.config), "--no-migrate", "--metrics-bind", self.metrics]
        with self.err.open("wb") as err:
            self.process = subprocess.Popen(args, cwd=self.config.parent, env=clean_env(), stdout=err,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"loader exited early: {self.stderr()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.metrics}/metrics", timeout=1).status_code == 200:
                    return self
            assert time.monotonic() < deadline, f"loader did not come up: {self.stderr()}"
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP / SIGCONT: a frozen loader can be looked at from outside
        (what the stream has delivered to it) before it is killed."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill9()


@dataclass
class RetryingLoad:
    """`threads` clients, each sending batches `<tag>-b<n>` of `size` events
    to its gateway; a batch answered 5xx or not at all is sent again,
    unchanged, until it is acknowledged (a connection error moves the client
    to the next gateway). `stop` lets every batch in flight finish so."""

    urls: list[str]
    threads: int = 4
    size: int = 50
    give_up_after: float = 60
    # The gateway every client starts on (None: client i starts on gateway i).
    start_at: int | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tally: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0
    _workers: list[threading.Thread] = field(default_factory=list)

    def _next(self) -> str:
        with self._lock:
            self._counter += 1
            return f"{self.tag}-b{self._counter}"

    def _note(self, key: str) -> None:
        with self._lock:
            self.tally[key] = self.tally.get(key, 0) + 1

    def _deliver(self, client: httpx.Client, prefix: str, gateway: int) -> tuple[bool, int]:
        deadline = time.monotonic() + self.give_up_after
        pause = 0.05
        while time.monotonic() < deadline:
            outcome = post_batch(client, self.urls[gateway % len(self.urls)], prefix, self.size, timeout=10)
            self._note(str(outcome.status) if outcome.status is not None else outcome.error)
            if outcome.status == 200:
                return True, gateway
            if outcome.status is not None and outcome.status < 500:
                return False, gateway  # a refusal is not retried (and fails the test)
            if outcome.status is None:
                gateway += 1
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        return False, gateway

    def _run(self, first: int) -> None:
        gateway = first
        with httpx.Client() as client:
            while not self._stop.is_set():
                prefix = self._next()
                ok, gateway = self._deliver(client, prefix, gateway)
                with self._lock:
                    (self.acked if ok else self.failed).append(prefix)

    def start(self) -> RetryingLoad:
        for i in range(self.threads):
            first = i if self.start_at is None else self.start_at
            worker = threading.Thread(target=self._run, args=(first,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_for(self, batches: int, timeout: float = 60) -> None:
        """Until `batches` more batches than now are acknowledged."""
        target = self.acked_count() + batches
        deadline = time.monotonic() + timeout
        while self.acked_count() < target:
            assert time.monotonic() < deadline, f"load stalled at {self.acked_count()} batches: {self.tally}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.give_up_after + 15)

    def acked_ids(self) -> list[str]:
        with self._lock:
            return [f"{p}-{i}" for p in self.acked for i in range(self.size)]


def wait_drained(storage_url: str, tag: str, ids: list[str], timeout: float = 45) -> dict[str, int]:
    """The stored counts once every id in `ids` is there (or at `timeout`),
    and a moment more, so that anything loaded late is counted too."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        counts = stored_counts(storage_url, tag + "-%")
        if wanted <= counts.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    time.sleep(1)
    return stored_counts(storage_url, tag + "-%")


class ProfileCounter:
    """One client sending `/engage` `$add {"n": 1}` and `$append {"seq": k}`
    to one person, one request at a time, never re-sent (an /engage has no
    insert id: a re-send would count twice with any sink). Applied exactly
    once and in stream order, the person ends with n = the acknowledged
    count and seq = the acknowledged k in order."""

    def __init__(self, url: str, person: str) -> None:
        self.url = url
        self.person = person
        self.acked: list[int] = []
        self.refused: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = {"$distinct_id": self.person, "$add": {"n": 1}, "$append": {"seq": k}}
                try:
                    status: int | str = client.post(self.url + "/engage", headers=TOKEN, json=body).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == 200:
                    self.acked.append(k)
                else:
                    self.refused.append(status)
                k += 1
                time.sleep(0.01)

    def start(self) -> ProfileCounter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def stored(self, timeout: float = 45) -> dict[str, object]:
        """The person's properties once n reaches the acknowledged count (or at `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = httpx.get(f"{self.url}/admin/v1/projects/shop/profiles/{self.person}",
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
            props: dict[str, object] = reply.json().get("properties", {}) if reply.status_code == 200 else {}
            if props.get("n") == len(self.acked) or time.monotonic() > deadline:
                return props
            time.sleep(0.25)
