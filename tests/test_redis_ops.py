"""Redis as the one stateful part: Sentinel failover, and a backup/restore drill from the AOF.

Only redis-server / redis-sentinel processes here, no worker and no engine: every job goes to
a model no worker serves, so it stays queued and every check reads the queue itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from devtools.redis_sentinel import MASTER_NAME, SentinelGroup
from devtools.redis_server import RedisServer
from producer import Client, CompletionJob, Settings, keys
from producer.aio import AsyncClient
from producer.connections import sentinel_target
from producer.errors import RedisFull, redact_url
from tests.conftest import ROOT
from worker.broker import job_id_of

PASSWORD = "test-only-sentinel-password"
UNSERVED = "nobody-serves-this"
PRIORITIES = (9, 5, 0)


def _submit(client: Client, per_priority: int, tag: str) -> dict[int, list[str]]:
    return {p: client.submit_many([CompletionJob(model=UNSERVED, prompt=f"{tag} {p}-{i}", priority=p)
                                   for i in range(per_priority)]) for p in PRIORITIES}  # fmt: skip


def _ids_in_lists(r: redis.Redis) -> dict[int, set[str]]:
    """The job ids in each non-empty priority list of the unserved model's queue, read raw from one server."""
    found = {p: {job_id_of(m) for m in r.lrange(name, 0, -1)} for p, name in keys.queue_lists(UNSERVED).items()}
    return {p: ids for p, ids in found.items() if ids}


def _assert_every_job_queued(client: Client, ids: dict[int, list[str]]) -> None:
    """What an operator sees: ``vqueue queue``'s counts per priority and each job's own record."""
    stats = client.queue_stats(UNSERVED)[0]
    assert stats.waiting_by_priority == {p: len(ids[p]) for p in PRIORITIES}
    states = {client.job(job_id).state for batch in ids.values() for job_id in batch}
    assert states == {"queued"}


def _wait_replicated(group: SentinelGroup) -> None:
    """A planned failover starts once the replica holds every write (as an operator checks first)."""
    master, replica = group.server(group.ports["a"]), group.server(group.ports["b"])
    deadline = time.monotonic() + 10
    while replica.info("replication")["slave_repl_offset"] < master.info("replication")["master_repl_offset"]:
        assert time.monotonic() < deadline, "the replica never caught up with the master"
        time.sleep(0.05)


def test_settings_refuse_a_sentinel_url_without_its_master_and_the_reverse() -> None:
    # Bug caught: a sentinel:// URL whose master name is forgotten fails only at the first
    # job, deep in kombu ("master_name" KeyError), instead of at start naming the setting.
    with pytest.raises(ValueError, match=r"redis\.sentinel_master"):
        Settings(redis={"url": "sentinel://127.0.0.1:26379/0"})
    with pytest.raises(ValueError, match="not a sentinel:// URL"):
        Settings(redis={"url": "redis://127.0.0.1:6379/0", "sentinel_master": "m"})
    target = sentinel_target(Settings(redis={"url": "sentinel://:p%40ss@s1:26380/3;sentinel://s2/3",
                                             "sentinel_master": "m"}).redis)  # fmt: skip
    assert target.sentinels == [("s1", 26380), ("s2", 26379)] and target.db == 3 and target.password == "p@ss"
    # Error messages mask the password of every address (BrokerUnavailable prints redis.url).
    assert redact_url("sentinel://:pw1@s1:26379/0;sentinel://:pw2@s2:26379/0") == \
        "sentinel://:***@s1:26379/0;sentinel://:***@s2:26379/0"


def test_worker_broker_and_result_backend_resolve_a_sentinel_url() -> None:
    # Bug caught: the worker's broker silently falling back to kombu's plain transport (no
    # dead-lettering: one bad message stops the worker) or to a single server (no failover),
    # or its result backend built without the master's name.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VQUEUE_REDIS__SENTINEL_MASTER": "mymaster",
           "VQUEUE_REDIS__URL": "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2:26379/2"}  # fmt: skip
    probe = (
        "import json; from worker.celery_app import app; from worker import broker;"
        "conn = app.connection_for_write(); b = app.backend;"
        "print(json.dumps({'transport': type(conn.transport).__module__ + ':' + type(conn.transport).__name__,"
        " 'channel_bases': [c.__module__ + '.' + c.__name__ for c in conn.transport.Channel.__mro__],"
        " 'alt': conn.alt, 'master': conn.transport_options['master_name'],"
        " 'backend': type(b).__name__, 'backend_master': b._transport_options['master_name'],"
        " 'hosts': [(h['host'], h['port']) for h in b.connparams['hosts']], 'db': b.connparams['db'],"
        " 'password': b.connparams['password']}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["transport"] == "worker.broker:SentinelTransport"
    # vqueue's guarded channel (dead letters, orphans) first, on kombu's Sentinel channel.
    assert built["channel_bases"][:3] == ["worker.broker.SentinelChannel", "worker.broker.Channel",
                                          "kombu.transport.redis.SentinelChannel"]  # fmt: skip
    assert built["alt"] == ["sentinel://:pw@10.0.0.1:26379/2", "sentinel://10.0.0.2:26379/2"]
    assert built["master"] == built["backend_master"] == "mymaster"
    assert built["backend"] == "SentinelBackend"
    assert built["hosts"] == [["10.0.0.1", 26379], ["10.0.0.2", 26379]] and built["db"] == 2
    assert built["password"] == "pw"


#: Run by a subprocess with the worker's settings: takes one job through the worker's own broker
#: transport and writes through its result backend's client, then says where they went.
_WORKER_SIDE = """
import json, sys
from kombu import Consumer
from worker.celery_app import app, settings
from producer import keys
queue = app.amqp.queues[keys.queue_for(settings.model.served_name)]
held = []
with app.connection_for_read() as conn:
    # Room for 5, as a worker with 5 free slots: one BRPOP, then the batch take for the rest.
    with Consumer(conn, queues=[queue], callbacks=[lambda body, message: held.append(message)], accept=["json"],
                  prefetch_count=5):
        conn.drain_events(timeout=20)
        for message in held:
            message.ack()
taken = [message.headers["id"] for message in held]
client = app.backend.client
client.set("vqueue-test:backend-write", "1")
print(json.dumps({"taken": taken, "backend_port": client.connection_pool.get_master_address()[1]}))
"""


def test_planned_sentinel_failover_keeps_every_queued_job_and_every_client_follows(tmp_path: Path) -> None:
    # Bugs caught: a client pinned to the first master (writes fail READONLY after the switch,
    # or land on a server that is no longer the master); jobs queued before the failover not on
    # the new master; the gateway's asyncio client or the worker's broker not following.
    with SentinelGroup(PASSWORD, tmp_path) as group:
        settings = Settings(redis={"url": group.url, "sentinel_master": MASTER_NAME})
        old_master = group.master_port()
        assert old_master == group.ports["a"]

        async def async_submit(client: AsyncClient, prompt: str) -> str:
            job_id, enqueued = await client.submit(CompletionJob(model=UNSERVED, prompt=prompt))
            assert enqueued
            return job_id

        async def scenario() -> None:
            async with AsyncClient(settings, max_connections=4) as gateway_client:
                with Client(settings) as client:
                    # Given jobs queued through the producer and the gateway's client, on the master
                    ids = _submit(client, 20, "before")
                    ids[5].append(await async_submit(gateway_client, "gateway before"))
                    assert _ids_in_lists(group.server(old_master)) == {p: set(v) for p, v in ids.items()}
                    _wait_replicated(group)
                    # When the sentinel promotes the replica
                    new_master = await asyncio.to_thread(group.failover)
                    assert new_master == group.ports["b"]
                    # Then the same clients find every job and submit to the new master
                    _assert_every_job_queued(client, ids)
                    ids[5].append(client.submit(CompletionJob(model=UNSERVED, prompt="after")))
                    ids[5].append(await async_submit(gateway_client, "gateway after"))
                    assert await gateway_client.queue_length(UNSERVED) == 63
                assert _ids_in_lists(group.server(new_master)) == {p: set(v) for p, v in ids.items()}
                assert group.server(old_master).info("replication")["role"] == "slave"

        asyncio.run(scenario())
        # A producer started after the failover finds them all too.
        with Client(settings) as fresh:
            _assert_every_job_queued(fresh, {p: _ids_in_lists(group.server(group.ports["b"]))[p] for p in PRIORITIES})
            assert fresh.queue_length(UNSERVED) == 63

        # The worker's own broker transport and result backend reach the new master too.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VQUEUE_REDIS__URL": group.url,
               "VQUEUE_REDIS__SENTINEL_MASTER": MASTER_NAME, "VQUEUE_MODEL__SERVED_NAME": UNSERVED}  # fmt: skip
        out = subprocess.run([sys.executable, "-c", _WORKER_SIDE], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=90)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        worker_side = json.loads(out.stdout.strip().splitlines()[-1])
        highest = _ids_in_lists(group.server(group.ports["b"]))
        assert worker_side["backend_port"] == group.ports["b"]
        assert group.server(group.ports["b"]).get("vqueue-test:backend-write") == b"1"
        # five taken off the new master's lists, priority 9 first, as a worker with 5 free slots takes them
        assert len(worker_side["taken"]) == 5 and not set(worker_side["taken"]) & highest[9]
        assert len(highest[9]) == 15
        assert group.server(group.ports["b"]).hlen(keys.UNACKED_KEY) == 0  # all five held, then acked


def test_backup_and_restore_drill_from_the_aof_finds_every_queued_job(tmp_path: Path) -> None:
    # Bug caught: a backup procedure that misses part of Redis 7's multi-part AOF (the
    # appendonlydir's base + incr files + manifest) restores an empty or partial queue.
    with RedisServer(tmp_path / "live", appendonly=True) as live:
        admin = redis.Redis.from_url(live.url)
        with Client(Settings(redis={"url": live.url})) as client:
            ids = _submit(client, 100, "drill")
            # A rewrite between writes: the backup then holds a base file and an increment.
            admin.bgrewriteaof()
            while admin.info("persistence")["aof_rewrite_in_progress"] or admin.info("persistence")[
                    "aof_rewrite_scheduled"]:
                time.sleep(0.05)
            ids[0].append(client.submit(CompletionJob(model=UNSERVED, prompt="after the rewrite", priority=0)))
        # The backup: the AOF directory as it is on disk, one fsync (appendfsync everysec) later.
        time.sleep(1.5)
        aof_dir = admin.config_get("appenddirname")["appenddirname"]
        backup = tmp_path / "backup"
        shutil.copytree(live.dir / aof_dir, backup / aof_dir)
    copied = sorted(f.name for f in (backup / aof_dir).iterdir())
    assert any(n.endswith(".base.rdb") or n.endswith(".base.aof") for n in copied), copied
    assert any(n.endswith(".incr.aof") for n in copied) and any(n.endswith(".manifest") for n in copied), copied
    # The restore: a fresh Redis on another port, started from the copy alone.
    with RedisServer(backup, appendonly=True) as restored, Client(Settings(redis={"url": restored.url})) as client:
        _assert_every_job_queued(client, ids)
        assert _ids_in_lists(redis.Redis.from_url(restored.url)) == {p: set(v) for p, v in ids.items()}


def test_a_full_redis_takes_whole_pipelines_of_jobs_and_the_error_says_how_many(tmp_path: Path) -> None:
    # Given a Redis at a small maxmemory, refusing writes rather than evicting (as vqueue asks)
    with RedisServer(tmp_path / "redis") as server:
        r = redis.Redis.from_url(server.url)
        r.config_set("maxmemory", "4mb")
        r.config_set("maxmemory-policy", "noeviction")
        jobs = [CompletionJob(model="tiny-full", prompt=f"{i} " + "x" * 200) for i in range(5000)]
        # When one call submits more than fits
        with Client(Settings(redis={"url": server.url})) as client, pytest.raises(RedisFull) as info:
            client.submit_many(jobs)
        # Then it says how many went in, and exactly those are queued, whole (record and message)
        sent = info.value.sent
        assert 0 < sent < len(jobs) and info.value.total == len(jobs)
        assert f"{sent} of this call's {len(jobs)} jobs were queued" in str(info.value)
        with Client(Settings(redis={"url": server.url})) as client:
            assert client.queue_length("tiny-full") == sent
        records = r.pipeline(transaction=False)
        for job in jobs:
            records.exists(keys.job_key(job.id))
        assert records.execute() == [1] * sent + [0] * (len(jobs) - sent)
