"""gateway.redislink.Channel against a real Redis of the test's own: error
replies returned, and a connection the server dropped replaced within the
call. (Scripts by SHA, loaded when Redis lacks them: tests/gateway/test_flight.py.)"""

from __future__ import annotations

import pytest
import redis

from gateway.redislink import Channel

pytestmark = pytest.mark.anyio

async def test_replies_in_order_with_errors_returned(link) -> None:
    channel = Channel(link)
    await link.client.set("a", "1")
    replies = await channel.execute([("MGET", "a", "b"), ("INCR", "a"), ("LPUSH", "a", "x"), ("GET", "a")])
    assert replies[:2] == [[b"1", None], 2]
    assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert replies[3] == b"2"


async def test_a_connection_redis_dropped_is_replaced_within_the_call(own_redis, link) -> None:
    channel = Channel(link)
    (first,) = await channel.execute([("CLIENT", "ID")])
    assert await link.client.client_kill_filter(_id=first) == 1
    (second,) = await channel.execute([("CLIENT", "ID")])  # retried on a new connection
    assert second != first
    own_redis.kill()
    with pytest.raises(redis.ConnectionError):
        await channel.execute([("PING",)])


def test_pack_writes_what_the_client_would() -> None:
    from redis.asyncio.connection import Connection

    from gateway.redislink import pack

    commands = [("EVALSHA", "f00", 2, "k1", b"k\xff2", 100, 1.5, "\u00e9"), ("MGET", "a"), ("PING",)]
    assert pack(commands) == b"".join(Connection().pack_commands(commands))
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])
