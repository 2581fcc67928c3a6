"""worker.broker's QoS against a real redis-server: a held message's bookkeeping when Redis goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kombu
import pytest
import redis

from devtools.redis_server import RedisServer
from producer import Client, CompletionJob, keys
from producer.settings import Settings
from producer.transport import priority_options
from worker import broker

ROOT = Path(__file__).resolve().parent.parent


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


def _consume(conn: kombu.Connection, queue: str, prefetch: int) -> tuple[kombu.transport.virtual.Channel, list]:
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    received: list = []
    channel.basic_consume(queue, no_ack=False, callback=received.append, consumer_tag="take-test")
    return channel, received


def _worker_connection(url: str) -> kombu.Connection:
    return kombu.Connection(url, transport=broker.Transport,
                            transport_options={**priority_options(), "unacked_key": keys.UNACKED_KEY,
                                               "unacked_index_key": keys.UNACKED_INDEX_KEY})


def test_a_burst_is_taken_in_batches_most_urgent_first_and_every_taken_message_is_held(tmp_path: Path) -> None:
    # Bugs it catches: the batch take (worker.broker._TAKE) skipping priorities or taking past
    # the free prefetch slots; a message off its queue but not in `unacked` (lost if the worker
    # died then); a held record kombu cannot read back (its restore would drop the job).
    with RedisServer(tmp_path) as server, _worker_connection(server.url) as conn, \
            Client(Settings(redis={"url": server.url})) as client:
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        urgent = client.submit_many([CompletionJob(model="take", prompt="u", priority=9) for _ in range(3)])
        normal = client.submit_many([CompletionJob(model="take", prompt="n") for _ in range(200)])
        queue = keys.queue_for("take")
        channel, received = _consume(conn, queue, prefetch=100)
        # When the consumer reads once (one BRPOP, then batches of broker.TAKE_MAX)
        conn.drain_events(timeout=5)
        # Then it took exactly as many as it had free slots, the urgent ones first, in queue order
        taken = [m.headers["id"] for m in received]
        assert len(taken) == 100
        assert taken[:3] == urgent and taken[3:] == normal[:97]
        assert not channel.qos.can_consume()
        # And every message off the queue is held in Redis, in kombu's own record
        assert sum(admin.llen(name) for name in keys.queue_lists("take").values()) == 200 + 3 - 100
        assert admin.zcard(keys.UNACKED_INDEX_KEY) == admin.hlen(keys.UNACKED_KEY) == 100
        for message in received:
            envelope, exchange, routing_key = json.loads(admin.hget(keys.UNACKED_KEY, message.delivery_tag))
            assert envelope == message._raw and routing_key == message.delivery_info["routing_key"]
            assert exchange == message.delivery_info["exchange"]
        # And kombu's restore (a dead worker's lease running out) puts a held one back on its queue
        before = admin.llen(keys.priority_list(queue, 9))
        channel.qos.restore_by_tag(received[0].delivery_tag)
        assert admin.llen(keys.priority_list(queue, 9)) == before + 1
        assert not admin.hexists(keys.UNACKED_KEY, received[0].delivery_tag)


def test_an_unreadable_message_in_a_batch_is_dead_lettered_and_the_rest_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bug it catches: one bad message in a batch taking the batch (or the consumer) down with
    # it, or staying held in `unacked` forever (and coming back at every lease sweep).
    malformed: list = []
    monkeypatch.setattr(broker, "on_malformed", lambda raw, queue, job_id, error: malformed.append((raw, error)))
    with RedisServer(tmp_path) as server, _worker_connection(server.url) as conn, \
            Client(Settings(redis={"url": server.url})) as client:
        admin = redis.Redis.from_url(server.url)
        queue, default = keys.queue_for("take"), keys.queue_lists("take")[5]
        first = client.submit_many([CompletionJob(model="take", prompt="a") for _ in range(2)])
        admin.lpush(default, b"\xff not json")
        envelope = json.loads(admin.lindex(default, -1))  # a readable envelope whose task is not vqueue's
        envelope["headers"]["task"] = "someone.else"
        envelope["properties"]["delivery_tag"] = "another-tag"
        admin.lpush(default, json.dumps(envelope))
        last = client.submit_many([CompletionJob(model="take", prompt="b") for _ in range(2)])
        _, received = _consume(conn, queue, prefetch=10)
        conn.drain_events(timeout=5)
        assert [m.headers["id"] for m in received] == first + last
        assert [type(error).__name__ for _, error in malformed] == ["MalformedMessage", "MalformedMessage"]
        assert admin.llen(default) == 0
        assert admin.hlen(keys.UNACKED_KEY) == admin.zcard(keys.UNACKED_INDEX_KEY) == 4


def test_the_workers_result_backend_has_a_redis_connection_for_every_pool_thread() -> None:
    # Bug it catches: Celery's result backend on redis-py's default pool of 100 connections
    # under 1000 pool threads: "Too many connections", logged with a traceback and retried
    # after a sleep, thousands of times per burst (the worker's intake halved).
    env = {**os.environ, "VQUEUE_REDIS__URL": "redis://127.0.0.1:1/0", "VQUEUE_WORKER__MAX_IN_FLIGHT": "1000"}
    code = "from worker.celery_app import app; print(app.backend.client.connection_pool.max_connections)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 1000
