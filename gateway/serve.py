"""Running an ASGI app under hypercorn: one process, or a supervisor of
worker processes.

Every worker opens its own listening socket on the same address with
SO_REUSEPORT, so the kernel spreads new connections evenly over the workers
(one socket shared by all workers lets whichever wakes first take most of
them). Each worker is the single-process server, drain included (see
`gateway.http.Drain`), so SIGTERM behaves the same with one worker or many:
the supervisor passes it on and waits for every worker to finish.

    python -m gateway.serve MODULE:APP --bind HOST:PORT [--workers N]

serves any ASGI app this way (the benchmark's HTTP ceiling uses it, so it
runs on exactly the gateway's server).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway import logs

log = logging.getLogger("dialgate")

# After SIGTERM, how long a worker must see no request before it stops.
DRAIN_QUIET = 0.2


class CannotListen(Exception):
    pass


def hypercorn_config(bind: str, *, graceful_timeout: float, read_timeout: float, reuse_port: bool) -> Any:
    from hypercorn.config import Config

    config = Config()
    # Bound here, before the app starts, so a taken port fails at once.
    config.bind = [_bound_fd(bind, reuse_port)]
    # Hypercorn's share of the graceful timeout; the drain takes the rest.
    config.graceful_timeout = graceful_timeout / 2
    # Slow clients trickling a body are cut off after read_timeout seconds.
    config.read_timeout = read_timeout
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _bound_fd(bind: str, reuse_port: bool) -> str:
    """A socket of this process's own bound to `bind`, as hypercorn's `fd://`
    binding (hypercorn would bind a single worker's socket without
    SO_REUSEPORT, and only after the app's startup). Raises CannotListen."""
    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host or "0.0.0.0", int(port)))
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return f"fd://{sock.detach()}"


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


def run_one(app: Any, config: Any, *, graceful_timeout: float, banner: str = "") -> int:
    """Serve `app` in this process until SIGTERM or SIGINT, draining first."""
    from hypercorn.asyncio import serve

    from gateway.http import Drain

    drain = Drain(app)
    tune_gc()

    async def main() -> None:
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        if banner:
            log.info("%s", banner)

        async def shutdown_trigger() -> None:
            # Drain first: keep serving (answers now close their connection)
            # until nothing has been in flight for a moment, so requests sent
            # just before the signal are answered; only then tell hypercorn,
            # which closes the idle connections and waits for the rest.
            await signalled.wait()
            drain.begin()
            await drain.idle(quiet=DRAIN_QUIET, timeout=graceful_timeout / 2)

        await serve(drain, config, shutdown_trigger=shutdown_trigger)

    asyncio.run(main())
    return 0


def supervise(argv: Sequence[str], workers: int, *, graceful_timeout: float) -> int:
    """Run `workers` copies of the command `argv` (each a `--worker`), pass
    SIGTERM and SIGINT on, and wait for all. If one exits on its own, the
    others are stopped too and the exit code is 1 (the service manager
    restarts the whole gateway)."""
    stopping = False
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(workers):
            children.append(subprocess.Popen(list(argv)))
        failed = False
        while not stopping:
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
        if failed or any(child.returncode != 0 for child in children):
            return 1
        return 0
    finally:
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logs.configure()
    if args.workers > 1 and not args.worker:
        child = [sys.executable, "-m", "gateway.serve", args.app, "--bind", args.bind,
                 "--graceful-timeout", str(args.graceful_timeout), "--worker"]
        return supervise(child, args.workers, graceful_timeout=args.graceful_timeout)
    try:
        config = hypercorn_config(args.bind, graceful_timeout=args.graceful_timeout, read_timeout=30,
                                  reuse_port=args.worker)
    except CannotListen as exc:
        print(f"gateway.serve: {exc}", file=sys.stderr)
        return 2
    return run_one(_import(args.app), config, graceful_timeout=args.graceful_timeout,
                   banner=f"serving {args.app} on http://{args.bind} (pid {os.getpid()})")


if __name__ == "__main__":
    sys.exit(main())
