"""kombu's Redis transport, changed where it could lose or kill: unreadable messages, restores.

kombu decodes each message it pops (BRPOP) inside ``Channel._brpop_read``, before Celery
sees it. There, one message that is not JSON (binary garbage, a truncated write) raises
``JSONDecodeError`` in the consumer, which Celery treats as unrecoverable: the worker shuts
down, engine and all, and the popped message is gone. Messages that are JSON but not kombu's
envelope, or whose body does not decode, were dropped by Celery without a result.

``Channel._brpop_read`` below is kombu 5.7's (``pyproject.toml`` pins kombu's minor version;
``tests/test_fuzz.py`` checks the envelope contract against kombu) with the decode replaced by
``read_envelope``, which checks everything the worker later relies on. A message that fails
goes to ``on_malformed`` (set by ``worker.celery_app``: dead-letter record with the raw bytes,
a typed failure for its job when an id can be read, a counter and a log line) and the
consumer carries on with the next one. ``QoS`` below: a dropped connection no longer puts
the jobs this worker still runs back on the queue, and a message taken just as Redis went
away is put back on its queue rather than lost (``_Orphans``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str

from producer import keys
from producer.connections import is_sentinel
from producer.errors import InvalidJob, MalformedMessage, WireError

log = logging.getLogger(__name__)

#: Called with (raw bytes, queue, job id or None, the error) for each unreadable message.
MalformedHandler = Callable[[bytes, str, "str | None", WireError], None]


def _log_only(raw: bytes, queue: str, job_id: str | None, error: WireError) -> None:
    log.error("unreadable message on %s (job %s): %s", queue, job_id, error)


on_malformed: MalformedHandler = _log_only


def read_envelope(raw: bytes | str) -> dict[str, Any]:
    """kombu's Redis envelope, checked down to the task's arguments; raises ``WireError``.

    Returns the decoded envelope for kombu to deliver. Only vqueue's own task may arrive on
    vqueue's queues, with its one JSON payload argument.
    """
    try:
        envelope = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(None, f"the message is not JSON ({exc})") from None
    if not isinstance(envelope, dict):
        raise MalformedMessage(None, f"the message is JSON {type(envelope).__name__}, not kombu's envelope object")
    headers, properties = envelope.get("headers"), envelope.get("properties")
    if not isinstance(properties, dict):
        raise MalformedMessage("properties", "missing or not an object")
    info = properties.get("delivery_info")
    if not isinstance(properties.get("delivery_tag"), str) or not isinstance(info, dict) \
            or not isinstance(info.get("routing_key"), str) or "exchange" not in info:
        raise MalformedMessage("properties", "delivery_tag / delivery_info (exchange, routing_key) missing or wrong")
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
        raise MalformedMessage("headers", "missing, or no task name (Celery's message protocol 2)")
    if headers["task"] != keys.GENERATE_TASK:
        raise MalformedMessage("headers.task", f"{headers['task']!r} is not a vqueue task ({keys.GENERATE_TASK})")
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        raise MalformedMessage("headers.id", "missing or not a string")
    content_type = envelope.get("content-type")
    if content_type != "application/json":
        raise InvalidJob("content-type", f"{content_type} messages are refused; vqueue accepts JSON only "
                                         "(submit with producer.Client, or send_task(..., serializer='json'))")
    body = envelope.get("body")
    if not isinstance(body, str):
        raise MalformedMessage("body", "missing or not a string")
    try:
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True).decode()
        args, kwargs, _embed = json.loads(body)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise MalformedMessage("body", f"not base64 JSON [args, kwargs, embed] ({exc})") from None
    if not isinstance(args, list) or len(args) != 1 or kwargs != {}:
        raise MalformedMessage("body", f"{keys.GENERATE_TASK} takes exactly one argument, the job")
    return envelope


def _field_of(raw: bytes | str, *path: str) -> Any:
    """A field of an unreadable message (``"headers", "id"``), where one can still be read."""
    try:
        value: Any = json.loads(raw)
        for name in path:
            value = value[name]
    except Exception:
        return None
    return value


def job_id_of(raw: bytes | str) -> str | None:
    """The job id of an unreadable message, where one can still be read."""
    job_id = _field_of(raw, "headers", "id")
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= 128 else None


def _readable_or_dead_lettered(raw: bytes | str, queue: str) -> dict[str, Any] | None:
    """The message's envelope (``read_envelope``), or None once ``on_malformed`` has it."""
    try:
        return read_envelope(raw)
    except WireError as error:
        try:
            on_malformed(raw, queue, job_id_of(raw), error)
        except Exception:  # Redis away, say: the message is lost, the worker is not
            log.exception("could not dead-letter an unreadable message on %s", queue)
        return None


class _Orphans:
    """Messages this process popped from a queue but could not record as held.

    kombu takes a message with BRPOP, then records it in ``unacked`` in a second round trip.
    If Redis goes away in between (a restart, a failover), the message is off its queue and in
    no lease: kombu drops it and the job is lost, with nobody to tell. Here it is kept in
    memory and pushed back onto its queue by the next channel that reaches Redis (the consumer
    reconnects with a new channel), before that channel takes anything. It is lost only if
    this process also dies before Redis is back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[dict[str, Any], str, str]] = []

    def keep(self, raw: dict[str, Any], exchange: str, routing_key: str) -> None:
        with self._lock:
            self._held.append((raw, exchange, routing_key))

    def put_back(self, channel: kombu_redis.Channel) -> None:
        with self._lock:
            held, self._held = self._held, []
        if not held:
            return
        try:
            with channel.conn_or_acquire() as client, client.pipeline() as pipe:
                for raw, exchange, routing_key in held:
                    # RPUSH: the end BRPOP takes from, where the message was
                    channel._do_restore_message(raw, exchange, routing_key, pipe, leftmost=False)
                pipe.execute()
        except Exception:
            with self._lock:
                self._held = held + self._held
            raise
        log.warning("put %d message(s) back on their queue that were taken just as Redis went away", len(held))


orphans = _Orphans()


#: Takes up to ARGV[1] more messages, KEYS[1..n-2] in priority order (BRPOP's order), and records
#: each as held (``unacked_index`` = KEYS[n-1], ``unacked`` = KEYS[n]) as kombu's QoS.append
#: would, in one atomic step: no message is ever off its queue and in no lease (kombu's own
#: BRPOP-then-record leaves that gap for every message). The shebang makes Redis refuse the
#: whole script up front when it is at maxmemory, never half of it. A message whose envelope
#: the script cannot read is returned unrecorded, for ``read_envelope`` to dead-letter.
_TAKE = """#!lua
local want, now, out = tonumber(ARGV[1]), ARGV[2], {}
local index, unacked = KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, #KEYS - 2 do
  while #out < want do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local ok, env = pcall(cjson.decode, raw)
    local p = ok and type(env) == 'table' and env.properties
    local info = type(p) == 'table' and p.delivery_info
    if type(info) == 'table' and type(p.delivery_tag) == 'string' and type(info.routing_key) == 'string'
        and info.exchange ~= nil then
      redis.call('ZADD', index, now, p.delivery_tag)
      redis.call('HSET', unacked, p.delivery_tag,
                 '[' .. raw .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
      out[#out + 1] = {raw, 1}
    else
      out[#out + 1] = {raw, 0}
    end
  end
end
return out
"""
#: At most this many messages per take: the script holds Redis for its run (~1 µs per
#: kilobyte of message), and the consumer hands each one to the pool before it reads Redis again.
TAKE_MAX = 64
#: Takes after one BRPOP at most, so that a long backlog of jobs Celery drops at once (past
#: their deadline) cannot keep the consumer from its event loop: the next BRPOP carries on.
TAKES_PER_BRPOP = 16


class QoS(kombu_redis.QoS):
    """kombu's bookkeeping of held messages, made safe for leases.

    kombu puts every message a channel holds back on its queue when the channel closes, which
    also happens when the connection to Redis drops (a Redis restart) while this worker is
    still running those jobs: they would then run twice. Here nothing is restored on close;
    a job this worker still runs keeps its lease, and a dead worker's jobs come back when
    their leases expire (``worker.leases``). An ack or reject on a channel whose connection
    is gone is logged, not raised: the job's lease brings it back, and the stored result
    is returned instead of running it again.
    """

    restore_at_shutdown = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags that ``Channel.take_more`` recorded as held already, in Redis.
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)
            return
        try:
            super().append(message, delivery_tag)
        except Exception as exc:
            info = message.delivery_info
            orphans.keep(message._raw, info["exchange"], info["routing_key"])
            # A connection error makes the consumer reconnect (and the new channel puts the
            # message back); any other error (Redis out of memory, say) would stop the worker.
            raise redis.ConnectionError(f"could not record message {delivery_tag} as held ({exc}); "
                                        "it goes back on its queue once Redis is reachable") from exc

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except Exception as exc:  # the channel's connection is gone (AttributeError) or Redis is away
            self._forget(delivery_tag)
            log.warning("could not ack %s (%s: %s); its lease brings it back and its stored result is returned",
                        delivery_tag, type(exc).__name__, exc)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception as exc:
            self._forget(delivery_tag)
            log.warning("could not reject %s (%s: %s); its lease brings it back", delivery_tag, type(exc).__name__, exc)

    def _forget(self, delivery_tag: str) -> None:
        # kombu frees the message's prefetch slot only after the Redis write succeeded; a tag
        # left behind here would hold its slot for the worker's life: after N failed acks the
        # worker would take N fewer jobs at a time. The job itself is this worker's no longer:
        # its lease brings it back.
        kombu_virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None
    _take: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # raises unless Redis answered a PING
        orphans.put_back(self)

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis-py client (on the channel's one pool) for every lease write
        # and every ack: about a tenth of the worker's GIL time in a burst of jobs. One client
        # per channel does the same on the same pool; redis-py clients are thread-safe.
        if client:
            yield client
            return
        if self._sync_client is None:
            self._sync_client = self._create_client()
        yield self._sync_client

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            if not dest.startswith(keys.QUEUE_PREFIX):
                # Celery's own lists (remote-control replies to `celery inspect`, Flower): kombu's
                # decode, minus the crash.
                try:
                    envelope = json.loads(item)
                except ValueError:
                    log.error("dropped an unreadable message on %s (%d bytes)", dest, len(item))
                    return True
                self.connection._deliver(envelope, dest)
                return True
            envelope = _readable_or_dead_lettered(item, dest)
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            self.take_more(dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def take_more(self, dest: str) -> None:
        """After BRPOP brought one message: take what else is waiting, up to the free prefetch.

        BRPOP brings one message per round trip, and kombu then records it as held in a
        second; in a burst, each message also paid a turn of the consumer's event loop. Here
        the rest of a burst comes in batches of ``TAKE_MAX``, taken and recorded by one script
        (``_TAKE``). On a Redis error the next BRPOP carries on: a script Redis refused took
        nothing, and one whose reply was lost left what it took held, unrenewed, so its lease
        brings it back (``worker.leases``).
        """
        queue = keys.queue_of_list(dest)
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        for _ in range(TAKES_PER_BRPOP):
            if self._take is False:
                return
            room = self.qos.can_consume_max_estimate()
            want = min(TAKE_MAX, room if room is not None else TAKE_MAX)
            if want <= 0:
                return
            try:
                with self.conn_or_acquire() as client:
                    if self._take is None:
                        self._take = client.register_script(_TAKE)
                    taken = self._take(keys=[*lists, self.unacked_index_key, self.unacked_key],
                                       args=[want, time.time()])
            except redis.ResponseError as exc:
                if "OOM" not in str(exc):  # a Redis older than 7 (no shebang scripts): BRPOP alone
                    log.warning("Redis cannot run the batch take (%s); taking one message per BRPOP", exc)
                    self._take = False
                return
            except redis.RedisError:
                return
            for raw, recorded in taken:
                self._deliver_taken(raw, bool(recorded), queue)
            if len(taken) < want:
                return  # the queue is empty

    def _deliver_taken(self, raw: bytes, recorded: bool, queue: str) -> None:
        envelope = _readable_or_dead_lettered(raw, queue)
        if envelope is None:
            if recorded:  # held in Redis under a tag kombu never delivers: let it go
                with contextlib.suppress(redis.RedisError):
                    self.qos._remove_from_indices(_field_of(raw, "properties", "delivery_tag")).execute()
            return
        if recorded:
            self.qos.recorded.add(envelope["properties"]["delivery_tag"])
        self.connection._deliver(envelope, queue)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above on kombu's Sentinel pool: the master comes from the sentinels
    (``redis.sentinel_master``), asked again when a connection to it fails."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


#: What ``broker_transport`` names (kombu imports it by this path).
TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


def transport_for(url: str) -> str | None:
    """The broker transport for ``redis.url``: ours for ``redis://``, ``rediss://`` and
    ``sentinel://``; None (kombu's choice by scheme) for anything else (``memory://`` in tests)."""
    if is_sentinel(url):
        return SENTINEL_TRANSPORT
    return TRANSPORT if url.startswith(("redis://", "rediss://")) else None
