"""Every connection vqueue makes to Redis is built here, from ``redis.url`` (+ ``redis.sentinel_master``).

``redis.url`` takes two forms:

* ``redis://[:password@]host:port/db`` or ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...``:
  one Redis server (password and TLS in the URL).
* ``sentinel://[:password@]host:port/db;sentinel://host2:port/db;...`` with ``redis.sentinel_master``:
  Redis Sentinel. The sentinels are asked which server is the master of ``sentinel_master``
  (the name in their ``sentinel monitor NAME ...`` line) and asked again after a failover.
  This is kombu's and Celery's own form for the broker and the result backend (kombu's
  ``SentinelTransport``, Celery's ``SentinelBackend``), so the worker's broker, its result
  backend, the producer and the gateway all read the same setting. The password and db come
  from the first address and are the Redis servers' (the sentinels themselves are reached
  without one).

Who calls what: ``Client`` ``redis_client``; the gateway's ``AsyncClient`` ``async_redis``;
``make_celery`` (producers and the worker) passes ``redis.url`` itself as broker and result
backend URL, with ``celery_transport_options``; the worker picks its broker transport by
scheme (``worker.broker.transport_for``);
the worker's cancel listener ``redis_client``. The worker's heartbeat, leases, stream writer
and dead letters share its Celery result backend's client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from producer.settings import RedisSettings, Settings

SENTINEL_SCHEME = "sentinel"
#: kombu's and Celery's separator between the sentinels of one URL.
SENTINEL_SEPARATOR = ";"
SENTINEL_DEFAULT_PORT = 26379


def is_sentinel(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``sentinel://`` URL: where the sentinels are, and how to log in to the master."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int
    username: str | None
    password: str | None

    def connection_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs


def sentinel_target(redis_settings: RedisSettings) -> SentinelTarget:
    """``redis.url`` as sentinels; ``ValueError`` naming the setting if it is not a valid sentinel URL."""
    url, master = redis_settings.url, redis_settings.sentinel_master
    if not is_sentinel(url) or not master:
        raise ValueError("redis.url is not a sentinel:// URL with redis.sentinel_master set")
    sentinels: list[tuple[str, int]] = []
    first = None
    for chunk in url.split(SENTINEL_SEPARATOR):
        parts = urlsplit(chunk.strip())
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"redis.url: {chunk!r} is not sentinel://host:port; separate sentinels with ';' "
                             "(sentinel://:PASSWORD@s1:26379/0;sentinel://s2:26379/0)")
        sentinels.append((parts.hostname, parts.port or SENTINEL_DEFAULT_PORT))
        first = first or parts
    assert first is not None
    db = first.path.strip("/")
    return SentinelTarget(sentinels=sentinels, master=master, db=int(db) if db else 0,
                          username=unquote(first.username) if first.username else None,
                          password=unquote(first.password) if first.password else None)


def redis_client(settings: Settings) -> redis.Redis:
    """A redis-py client on the Redis master that ``redis.url`` names; after a Sentinel failover
    its next command goes to the new master."""
    if not is_sentinel(settings.redis.url):
        return redis.Redis.from_url(settings.redis.url)
    target = sentinel_target(settings.redis)
    manager = redis.sentinel.Sentinel(target.sentinels, **target.connection_kwargs())
    return manager.master_for(target.master)


class _BlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """redis-py's Sentinel pool, with the blocking pool's wait for a free connection (the
    gateway's behaviour past ``gateway.redis_max_connections``; the plain Sentinel pool raises)."""


def async_redis(settings: Settings, max_connections: int, timeout_s: float = 30) -> redis.asyncio.Redis:
    """An asyncio client on the master, with a blocking pool of ``max_connections``: past them a
    call waits up to ``timeout_s`` for a free connection instead of failing."""
    if not is_sentinel(settings.redis.url):
        pool = redis.asyncio.BlockingConnectionPool.from_url(settings.redis.url, max_connections=max_connections,
                                                             timeout=timeout_s, health_check_interval=30)
        return redis.asyncio.Redis(connection_pool=pool)
    target = sentinel_target(settings.redis)
    manager = redis.asyncio.sentinel.Sentinel(target.sentinels, **target.connection_kwargs())
    return manager.master_for(target.master, connection_pool_class=_BlockingSentinelPool,
                              max_connections=max_connections, timeout=timeout_s, health_check_interval=30)


def celery_transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's broker transport and Celery's result backend need on top of the URL:
    the master's name, for ``sentinel://`` (both read ``master_name``)."""
    if is_sentinel(settings.redis.url):
        return {"master_name": settings.redis.sentinel_master}
    return {}
