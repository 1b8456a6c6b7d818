"""Running an ASGI app: one process, or a supervisor of worker processes.

Every worker opens its own listening socket on the same address with
SO_REUSEPORT, so the kernel spreads new connections evenly over the workers
(one socket shared by all workers lets whichever wakes first take most of
them). Each worker is the single-process server, drain included (see
`gateway.http.Drain`), so SIGTERM behaves the same with one worker or many:
the supervisor passes it on and waits for every worker to finish.

Workers never outlive the supervisor: each asks the kernel for SIGTERM when
its parent dies (Linux `PR_SET_PDEATHSIG`) and also checks its parent every
second (anywhere), then drains and exits as on SIGTERM. SIGHUP calls the
`reload` given to `run_one` (gateway.reload); the supervisor calls its own
(a check) and passes SIGHUP on to every worker when that says yes. Without
one, SIGHUP is ignored with a log line.

    python -m gateway.serve MODULE:APP --bind HOST:PORT [--workers N]

serves any ASGI app this way (the benchmark's HTTP ceiling uses it, so it
runs on exactly the gateway's server).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway import logs, metrics
from gateway.server import Limits, Listener, serve

log = logging.getLogger("dialgate")

# After SIGTERM, how long a worker must see no request before it stops.
DRAIN_QUIET = 0.2
# How often a worker checks that its supervisor is still there.
PARENT_CHECK_SECONDS = 1.0
HANGUP_LINE = "SIGHUP ignored: this server has nothing to reload"


class CannotListen(Exception):
    pass


def hypercorn_config(*, graceful_timeout: float) -> Any:
    from hypercorn.config import Config

    config = Config()
    # Hypercorn's share of the graceful timeout; the drain takes the rest.
    config.graceful_timeout = graceful_timeout / 2
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def bind_socket(bind: str, reuse_port: bool) -> socket.socket:
    """A socket bound to `bind`, not yet listening: bound here, before the
    app starts, so a taken port fails at once. Raises CannotListen."""
    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host or "0.0.0.0", int(port)))
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    return sock


def tune_gc() -> None:
    """Fewer, larger collections of the cyclic garbage collector.

    A 500-event batch allocates thousands of containers that live until its
    commit; at CPython's default (a young collection every 700 allocations,
    a full one every 100 young ones) the collector kept walking the same
    live requests and took a third of the worker's time under load (the
    benchmark's batch scenarios ran 40 % faster with this). Reference counting
    still frees almost everything at once; only cycles wait longer. What
    exists at start (modules, the app) is frozen out of every collection.
    """
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()


def ignore_hangup() -> None:
    """SIGHUP does nothing (inherited by the workers started after this)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def hold_hangup() -> None:
    """SIGHUP is held (blocked, so kept pending; never fatal) until
    `run_one` can reload: one sent during start-up is applied once serving
    rather than lost. Workers started after this are born holding it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def release_hangup() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def die_with_parent() -> bool:
    """Ask the kernel for SIGTERM when the parent process dies (Linux only;
    elsewhere the parent check of `run_one` alone notices)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return int(libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def run_one(app: Any, listeners: Sequence[Listener], config: Any, limits: Limits, *, graceful_timeout: float,
            banner: str = "", parent: int | None = None, reload: Callable[[], object] | None = None) -> int:
    """Serve in this process until SIGTERM or SIGINT (or, for a worker, the
    death of its `parent`), draining first; `reload` is called on SIGHUP."""
    from gateway.http import Drain

    drain = Drain(app)
    tune_gc()

    async def main() -> None:
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Held here: the loop keeps only a weak reference to a task.
        watcher: asyncio.Task[None] | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload)
        elif parent is None:
            loop.add_signal_handler(signal.SIGHUP, log.warning, HANGUP_LINE)
        else:
            # A worker: its supervisor says it once for all.
            loop.add_signal_handler(signal.SIGHUP, lambda: None)
        # Handled from here on: a SIGHUP held since start-up arrives now.
        release_hangup()
        if parent is not None:
            watcher = loop.create_task(_watch_parent(parent, signalled))
        if banner:
            log.info("%s", banner)

        async def shutdown_trigger() -> None:
            # Drain first: keep serving (answers now close their connection)
            # until nothing has been in flight for a moment, so requests sent
            # just before the signal are answered; only then stop accepting,
            # close the idle connections and wait for the rest.
            await signalled.wait()
            drain.begin()
            await drain.idle(quiet=DRAIN_QUIET, timeout=graceful_timeout / 2)

        # The drain sees the requests of `app`'s listener (ingestion); an
        # admin listener's apps are served as they are.
        served = [dataclasses.replace(item, app=drain) if item.app is app else item for item in listeners]
        await serve(drain, served, config, limits, shutdown_trigger)
        if watcher is not None:
            watcher.cancel()  # as asyncio.run would on return

    asyncio.run(main())
    return 0


async def _watch_parent(parent: int, signalled: asyncio.Event) -> None:
    while not signalled.is_set():
        if os.getppid() != parent:
            log.warning("worker %d: the supervisor (pid %d) is gone; stopping", os.getpid(), parent)
            signalled.set()
            return
        await asyncio.sleep(PARENT_CHECK_SECONDS)


def supervise(argv: Sequence[str], workers: int, *, graceful_timeout: float,
              reload: Callable[[], bool] | None = None) -> int:
    """Run `workers` copies of the command `argv` (each a worker, told this
    process's pid with `--parent`), pass SIGTERM and SIGINT on, and wait for
    all. If one exits on its own, the others are stopped too and the exit
    code is 1 (the service manager restarts the whole gateway). On SIGHUP,
    `reload` is asked and, when it says yes, SIGHUP is passed on to every
    worker; without one, SIGHUP is ignored here and in the workers."""
    stopping = False
    hangups = 0
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def hangup(*_: Any) -> None:
        nonlocal hangups
        hangups += 1

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    # Held while the workers start, so they are born holding it (a worker
    # takes it once it can reload, see `run_one`); here it is counted
    # and passed on once they all run.
    hold_hangup()
    # The workers' metric files, one directory for the run (gateway.metrics).
    directory = metrics.fresh_directory()
    env = {**os.environ, metrics.MULTIPROC_ENV: directory}
    try:
        for _ in range(workers):
            children.append(subprocess.Popen([*argv, "--parent", str(os.getpid())], env=env))
        release_hangup()
        failed = False
        logged = 0
        while not stopping:
            if hangups != logged:
                logged = hangups
                if reload is None:
                    log.warning("%s", HANGUP_LINE)
                elif reload():
                    for child in children:
                        if child.poll() is None:
                            child.send_signal(signal.SIGHUP)
            for child in children:
                if child.poll() is not None:
                    log.error("worker %d exited with %s; stopping the others", child.pid, child.returncode)
                    failed = True
                    stop()
                    break
            else:
                time.sleep(0.2)
        stop()  # again: a signal during start-up reached only the workers started by then
        deadline = time.monotonic() + graceful_timeout + 5
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", child.pid)
                child.kill()
                child.wait()
            metrics.worker_exited(child.pid, directory)
        if failed or any(child.returncode != 0 for child in children):
            return 1
        return 0
    finally:
        release_hangup()
        metrics.remove_directory(directory)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _import(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute or "app")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.serve", description="Serve an ASGI app")
    parser.add_argument("app", help="MODULE:ATTRIBUTE")
    parser.add_argument("--bind", default="127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--graceful-timeout", type=float, default=10.0)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ignore_hangup()
    if args.parent is not None:
        die_with_parent()
    logs.configure()
    if args.workers > 1 and args.parent is None:
        child = [sys.executable, "-m", "gateway.serve", args.app, "--bind", args.bind,
                 "--graceful-timeout", str(args.graceful_timeout)]
        return supervise(child, args.workers, graceful_timeout=args.graceful_timeout)
    try:
        sock = bind_socket(args.bind, reuse_port=args.parent is not None)
    except CannotListen as exc:
        print(f"gateway.serve: {exc}", file=sys.stderr)
        return 2
    app = _import(args.app)
    return run_one(app, [Listener(sock, app, "public")], hypercorn_config(graceful_timeout=args.graceful_timeout),
                   Limits(read_timeout=30, max_connections=1000, h2c=False),
                   graceful_timeout=args.graceful_timeout, parent=args.parent,
                   banner=f"serving {args.app} on http://{args.bind} (pid {os.getpid()})")


if __name__ == "__main__":
    sys.exit(main())
