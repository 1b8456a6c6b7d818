"""The JetStream sink under load and kill -9, end to end with real processes:
a three-node nats-server cluster (tests/natscluster.py) holding a 3-replica
stream, two `dialgate serve` gateways with the jetstream sink, `dialgate
load` loaders into PostgreSQL, and clients that re-send a batch (same
insert ids) on a 5xx or a connection error, as the SDKs do. Whatever is
killed, once the loaders have drained the stream every acknowledged event
is stored exactly once (acknowledged / stored / duplicates / missing are
printed, as by the rest of the fault suite)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.faults.harness import Gateway, figures
from tests.faults.streamload import LoaderProcess, ProfileCounter, RetryingLoad, stream_config, wait_drained
from tests.natscluster import NatsCluster, nats_binary


@dataclass
class Rig:
    cluster: NatsCluster
    stream: str
    storage_url: str
    gateways: list[Gateway]
    loaders: list[LoaderProcess] = field(default_factory=list)

    def loader(self) -> LoaderProcess:
        started = LoaderProcess(self.gateways[0].config, f"loader{len(self.loaders)}")
        self.loaders.append(started)
        return started.start()


@pytest.fixture
def rig(tmp_path: Path, postgres_backend: dict[str, str]) -> Iterator[Rig]:
    if nats_binary() is None:
        from tests.conftest import unreachable

        unreachable("nats-server", "binary not installed (Debian package nats-server)")
    b = postgres_backend
    cluster = NatsCluster(tmp_path / "nats").start()
    stream = f"faults_{uuid.uuid4().hex[:8]}"
    extra = stream_config(cluster.servers, stream, replicas=3)
    gateways = [Gateway(tmp_path, f"gw{i}", b["storage_url"], b["redis_url"], b["redis_prefix"], extra=extra)
                for i in range(2)]
    rig = Rig(cluster, stream, b["storage_url"], gateways)
    try:
        # Side by side: each takes seconds of imports.
        with ThreadPoolExecutor(3) as pool:
            for started in [pool.submit(g.start) for g in gateways] + [pool.submit(rig.loader)]:
                started.result()
        yield rig
    finally:
        for loader in rig.loaders:
            loader.stop()
        for gateway in gateways:
            gateway.stop()
        cluster.stop()


def settle(rig: Rig, load: RetryingLoad, label: str) -> None:
    """Stop the clients (each batch in flight retried until acknowledged),
    wait for the loaders to drain, print and check the figures."""
    load.stop()
    assert not load.failed, f"batches never acknowledged: {load.failed[:3]} ({load.tally})"
    ids = load.acked_ids()
    counts = wait_drained(rig.storage_url, load.tag, ids)
    print(f"[{label}] client outcomes {load.tally}")
    result = figures(label, ids, ids, counts)
    assert result["acknowledged"] > 0
    assert (result["duplicates"], result["missing"], result["unexpected"]) == (0, 0, 0), result
    assert all(n == 1 for n in counts.values())
    # No process the test did not kill gave up on the way.
    for loader in rig.loaders:
        assert loader.killed or (loader.process and loader.process.poll() is None), loader.stderr()[-3000:]
    for gateway in rig.gateways:
        assert gateway.process and gateway.process.poll() in (None, -9), gateway.stderr()[-3000:]


def test_kill9_of_the_stream_leader_under_load(rig: Rig) -> None:
    load = RetryingLoad([g.url for g in rig.gateways]).start()
    load.wait_for(10)
    victim = rig.cluster.stream_leader(rig.stream)
    assert victim is not None, "the stream has no leader"
    rig.cluster.kill9(victim)
    # Two of three replicas are a quorum: acknowledgements go on.
    load.wait_for(15)
    assert not rig.cluster.nodes[victim].alive
    rig.cluster.restart(victim)
    load.wait_for(5)
    settle(rig, load, "jetstream: kill -9 of a NATS node")


def test_kill9_of_a_loader_mid_batch(rig: Rig) -> None:
    consumer = f"{rig.stream}_events"
    load = RetryingLoad([g.url for g in rig.gateways]).start()
    # Profile work beside the events: applied once each, in stream order,
    # across the kill (the next holder of the project's partition resumes).
    counter = ProfileCounter(rig.gateways[1].url, "fault-counter").start()
    load.wait_for(10)
    # Killed while it holds delivered, unacknowledged messages: frozen,
    # looked at from the stream's side, killed if it holds some (else let
    # go and tried again a moment later).
    loader = rig.loaders[-1]
    held = 0
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, "the loader never held a batch"
        time.sleep(0.02)
        loader.freeze(True)
        held = (rig.cluster.consumer(rig.stream, consumer) or {}).get("num_ack_pending") or 0
        if not held:
            loader.freeze(False)
    loader.kill9()
    load.wait_for(5)  # the gateways go on acknowledging without a loader
    rig.loader()
    print(f"[jetstream: kill -9 of a loader] {held} messages unacknowledged at the kill")
    load.wait_for(5)
    counter.stop()
    settle(rig, load, "jetstream: kill -9 of a loader mid-batch")
    props = counter.stored()
    print(f"[jetstream: kill -9 of a loader] profile $add acknowledged={len(counter.acked)} n={props.get('n')}")
    assert not counter.refused, counter.refused[:5]
    assert props.get("n") == len(counter.acked) > 0, props.get("n")
    assert props.get("seq") == counter.acked  # each once, in the order acknowledged


def test_kill9_of_a_gateway_clients_retry_on_the_other(rig: Rig) -> None:
    first, second = rig.gateways
    load = RetryingLoad([first.url, second.url], start_at=0).start()
    load.wait_for(10)
    first.kill9()
    load.wait_for(10)  # every client has moved to the second gateway
    settle(rig, load, "jetstream: kill -9 of a gateway")
    assert set(load.tally) - {"200"}, f"no client saw the kill: {load.tally}"
