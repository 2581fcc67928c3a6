"""Each job's record in Redis (``vqueue:job:<id>``) and the Lua scripts that change a job's state.

A job's state changes in three places, each one atomic Redis script so that no two can
interleave: a producer cancels it (``CANCEL``), a producer purges its queue (``PURGE``), a
worker picks it up (``PICK_UP``, the worker's one Redis round trip per job at pickup). Whichever
runs first decides: a job picked up before its cancel is running (its worker aborts it); a
job cancelled first is skipped at pickup, its attempt counter never created.

Record fields (a Redis hash; every value a string):

* at submit, in the pipeline that queues the message: ``model``, ``kind``, ``priority``,
  ``deadline`` (if any), ``state`` "queued", ``enqueued_at``;
* at each pickup: ``state`` "running", ``worker``, ``picked_up_at``, ``attempts`` (n) and
  ``attempt:<n>`` = "<worker> <epoch s>";
* when its engine dies with it: ``engine_deaths``, ``last_death``, ``state`` "queued" again;
* when cancelled while queued: ``state`` "cancelled", ``finished_at``.

The end of a job (its outcome, timeline, usage) is its result, read with the record by
``Client.job``: the worker writes nothing else at the end, so a job costs no round trip
beyond Celery's own result write.
"""

from __future__ import annotations

from typing import Any

from producer.protocol import Attempt

#: KEYS: result, attempt counter, cancel mark, record. ARGV: ttl s, revoked meta (JSON), job id,
#: cancel channel, now. Returns {"finished", meta} | {"unknown"} | {"queued"} | {"running", worker}.
CANCEL = """
local done = redis.call('GET', KEYS[1])
if done then return {'finished', done} end
if redis.call('EXISTS', KEYS[4]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then return {'unknown'} end
redis.call('SET', KEYS[3], 'cancelled', 'EX', ARGV[1])
local state = redis.call('HGET', KEYS[4], 'state')
if redis.call('EXISTS', KEYS[2]) == 0 or state == 'queued' then
  -- waiting in the queue (never started, or handed back after its engine died): its outcome
  -- is stored now, and the worker that reaches it skips it
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
  redis.call('PUBLISH', KEYS[1], ARGV[2])
  redis.call('HSET', KEYS[4], 'state', 'cancelled', 'finished_at', ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
  return {'queued'}
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return {'running', redis.call('HGET', KEYS[4], 'worker') or '?'}
"""

#: KEYS: one queue list. ARGV: ttl s, at most this many, meta prefix, meta suffix, now, result key
#: prefix, cancel key prefix, job key prefix. Takes the oldest messages off the list and stores
#: each one's outcome ("purged") in the same script: no job leaves the queue without one.
#: Returns the ids of the jobs purged.
PURGE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[2]), -1)
if #items == 0 then return {} end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
local ids = {}
for _, item in ipairs(items) do
  local ok, envelope = pcall(cjson.decode, item)
  local id = ok and type(envelope) == 'table' and type(envelope.headers) == 'table' and envelope.headers.id
  if type(id) == 'string' then
    local result = ARGV[6] .. id
    if redis.call('EXISTS', result) == 0 then
      local meta = ARGV[3] .. cjson.encode(id) .. ARGV[4]
      redis.call('SET', result, meta, 'EX', ARGV[1])
      redis.call('PUBLISH', result, meta)
    end
    redis.call('SET', ARGV[7] .. id, 'purged', 'EX', ARGV[1])
    if redis.call('EXISTS', ARGV[8] .. id) == 1 then
      redis.call('HSET', ARGV[8] .. id, 'state', 'cancelled', 'finished_at', ARGV[5])
    end
    ids[#ids + 1] = id
  end
end
return ids
"""

#: KEYS: attempt counter, result, cancel mark, record. ARGV: ttl s, worker, now.
#: Returns {"done", meta} (finished already: never run twice), {"cancelled"} (cancelled; no
#: attempt counted), or {"run", attempt, enqueued_at or false}.
PICK_UP = """
local done = redis.call('GET', KEYS[2])
if done then return {'done', done} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'cancelled'} end
local attempt = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], 'state', 'running', 'worker', ARGV[2], 'picked_up_at', ARGV[3],
           'attempts', attempt, 'attempt:' .. attempt, ARGV[2] .. ' ' .. ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[1])
return {'run', attempt, redis.call('HGET', KEYS[4], 'enqueued_at') or false}
"""


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


def attempts_of(record: dict[str, str]) -> list[Attempt]:
    out = []
    for field, value in record.items():
        if field.startswith("attempt:"):
            worker, _, at = value.rpartition(" ")
            out.append(Attempt(number=int(field.split(":", 1)[1]), worker=worker, picked_up_at=_float(at) or 0.0))
    return sorted(out, key=lambda a: a.number)


def fields_of(record: dict[str, str]) -> dict[str, Any]:
    """The ``JobRecord`` fields a record holds (the rest come from the result)."""
    priority = record.get("priority")
    return {
        "model": record.get("model"),
        "kind": record.get("kind"),
        "priority": int(priority) if priority and priority.isdigit() else None,
        "deadline": _float(record.get("deadline")),
        "enqueued_at": _float(record.get("enqueued_at")),
        "picked_up_at": _float(record.get("picked_up_at")),
        "finished_at": _float(record.get("finished_at")),
        "worker": record.get("worker"),
        "attempts": attempts_of(record),
        "engine_deaths": int(record.get("engine_deaths") or 0),
        "last_death": record.get("last_death"),
    }
