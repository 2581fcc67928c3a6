"""worker.broker's QoS against a real redis-server: a held message's bookkeeping when Redis goes away."""

from __future__ import annotations

from pathlib import Path

import kombu

from devtools.redis_server import RedisServer
from producer import keys
from worker import broker


def test_an_ack_that_cannot_reach_redis_frees_the_prefetch_slot_and_keeps_the_lease(tmp_path: Path) -> None:
    # Bug it catches: kombu frees a message's prefetch slot only after the ack's Redis write;
    # a failed ack then held the slot for the worker's life, one slot fewer per failed ack.
    with RedisServer(tmp_path, appendonly=True) as server, \
            kombu.Connection(server.url, transport=broker.Transport) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        conn.SimpleQueue("vqueue.qos-test").put({"n": 1})
        message = channel.basic_get("vqueue.qos-test", no_ack=False)
        assert message is not None
        assert not channel.qos.can_consume()  # the one slot is held
        # When Redis is away as the ack is sent
        server.kill()
        channel.basic_ack(message.delivery_tag)
        # Then the worker may take its next message
        assert channel.qos.can_consume()
        # And the message is still leased once Redis is back (its lease brings it back)
        server.start()
        assert conn.default_channel.client.hexists(keys.UNACKED_KEY, message.delivery_tag)
