"""The three-node JetStream harness against the real `nats-server`: a stream
with 3 replicas survives a kill -9 of its leader, keeps acknowledging
publishes on the two nodes left, and the restarted node catches up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.natscluster import NatsCluster, nats_binary

pytestmark = pytest.mark.anyio

STREAM = "harness"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    if nats_binary() is None:
        from tests.conftest import unreachable

        unreachable("nats-server", "binary not installed (Debian package nats-server)")
    with NatsCluster(tmp_path / "nats") as started:
        yield started


async def publish_until_acked(js, subject: str, msg_id: str, deadline: float) -> bool:
    """SDK-style: the same message id again until the stream acknowledges;
    returns whether the stream called it a duplicate."""
    import nats.errors
    import nats.js.errors

    while True:
        try:
            ack = await js.publish(subject, msg_id.encode(), headers={"Nats-Msg-Id": msg_id}, timeout=1)
            return bool(ack.duplicate)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            assert time.monotonic() < deadline, f"{msg_id} never acknowledged"
            await asyncio.sleep(0.05)


def test_cluster_starts_with_one_meta_leader_on_every_node(cluster: NatsCluster) -> None:
    leaders = {node.meta_leader() for node in cluster.nodes}
    assert len(leaders) == 1 and leaders <= {node.name for node in cluster.nodes}, leaders
    assert len(set(cluster.servers)) == 3
    assert all(node.healthy() for node in cluster.nodes)


async def test_three_replica_stream_survives_kill9_of_its_leader(cluster: NatsCluster) -> None:
    import nats

    nc = await nats.connect(servers=cluster.servers, connect_timeout=2, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name=STREAM, subjects=[f"{STREAM}.>"], num_replicas=3, duplicate_window=120)
        deadline = time.monotonic() + 60
        for i in range(200):
            await publish_until_acked(js, f"{STREAM}.before", f"b{i}", deadline)

        victim = cluster.stream_leader(STREAM)
        assert victim is not None, "the stream has no leader"
        cluster.kill9(victim)
        # Publishing goes on through the kill: the two nodes left are a quorum.
        acked_while_down = 0
        for i in range(300):
            await publish_until_acked(js, f"{STREAM}.during", f"d{i}", deadline)
            acked_while_down += 1
        assert not cluster.nodes[victim].alive
        assert cluster.stream_leader(STREAM) not in (None, victim)
        assert acked_while_down == 300

        cluster.restart(victim)
        # Re-sending an acknowledged id is recognised as a duplicate, not stored again.
        assert await publish_until_acked(js, f"{STREAM}.during", "d7", deadline) is True
        for i in range(100):
            await publish_until_acked(js, f"{STREAM}.after", f"a{i}", deadline)
        info = await js.stream_info(STREAM)
        assert info.state.messages == 600, info.state
        assert info.config.num_replicas == 3
    finally:
        await nc.close()

    # The restarted node holds its full replica again (it is healthy only when current).
    restarted = cluster.nodes[victim]
    for _ in range(100):
        status, body = restarted.monitor("/jsz")
        if status == 200 and body["messages"] == 600:
            break
        await asyncio.sleep(0.1)
    assert body["messages"] == 600, body
    assert restarted.healthy()
