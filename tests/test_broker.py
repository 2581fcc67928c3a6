"""worker.broker's QoS against a real redis-server: a held message's bookkeeping when Redis goes away."""

from __future__ import annotations

from pathlib import Path

import kombu
import pytest
import redis

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


def test_a_message_taken_just_as_redis_fails_goes_back_on_its_queue(tmp_path: Path) -> None:
    # Bug it catches: kombu pops a message (BRPOP), then records it as held in a second round
    # trip; when that fails the message was in no queue and no lease: lost without a trace.
    with RedisServer(tmp_path) as server, kombu.Connection(server.url, transport=broker.Transport) as conn:
        conn.SimpleQueue("orphan-test").put({"n": 1})
        admin = redis.Redis.from_url(server.url)
        # Given a Redis that still hands out messages but refuses the write that records one
        # as held (out of memory here; a restart at that moment does the same)
        admin.config_set("maxmemory", 1)
        received: list = []
        channel = conn.channel()
        channel.basic_consume("orphan-test", no_ack=False, callback=received.append, consumer_tag="t")
        # When the consumer takes the message, it is not run but a connection error is raised,
        # so that Celery's consumer reconnects
        with pytest.raises(redis.ConnectionError, match="goes back on its queue"):
            conn.drain_events(timeout=5)
        assert received == []
        assert admin.llen("orphan-test") == 0
        assert admin.hlen(keys.UNACKED_KEY) == 0
        # Then the next channel on a Redis that takes writes again puts it back on its queue
        admin.config_set("maxmemory", 0)
        conn.channel()
        assert admin.llen("orphan-test") == 1
