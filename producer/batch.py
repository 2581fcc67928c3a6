"""Batch files: OpenAI's Batch API / ``vllm run-batch`` JSONL in, its output format out; durable,
resumable, cancellable. One runner for ``vqueue batch run`` and the gateway's ``/v1/batches``.

Input: one JSON object per line, ``{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": <that endpoint's request>}``. Each valid line becomes one job,
``<batch id>-<line>`` (``keys.batch_job_id``), at ``queue.batch_priority`` unless its body sets
``priority``. Output: one line per input line, in the order they finish, in the output file
(succeeded) or the error file (everything else), in OpenAI's batch output format:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.

Why it survives anything: the jobs live in Redis; the output files are the only record of what
was written. A runner starts by reading them back (each line's ``id`` names its input line;
a last line cut short by a crash is cut off), submits only the lines with no job yet
(``Client.submit_new``: a job's message and record are written in one MULTI/EXEC), and waits
for the rest. Run it again after any crash and each line is written exactly once. One runner
per batch at a time (a lease in Redis, ``batch.lease_s``).

Memory: the input is read line by line and at most ``batch.window`` lines are in flight, so a
file of any size streams through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from producer import keys
from producer.client import AnyJob, Client
from producer.errors import JobCancelled, JobExpired, JobFailed, QueueFull, RedisFull, VQueueError
from producer.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_response,
    completion_response,
    failure,
    system_fingerprint,
    validation_error,
)
from producer.protocol import JobResult
from producer.watch import OutcomeWatcher

#: The endpoints a line may name, and the request each takes.
ENDPOINTS: dict[str, type[CompletionRequest] | type[ChatCompletionRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
#: A job id is at most 128 characters: the batch id's share of it.
MAX_BATCH_ID = 100
#: How long a runner waits for outcomes before it looks at its lease, its window and the clock.
TICK_S = 0.5


class BatchError(VQueueError):
    """The batch as a whole cannot run (its files, its lease); never a bad line (those go to the
    error file)."""


class BatchBusy(BatchError):
    """Another runner holds the batch's lease."""


@dataclasses.dataclass
class Progress:
    """What a runner has written so far (lines already in the files count too)."""

    total: int
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    #: Generated tokens of the lines this run wrote (for a rate).
    completion_tokens: int = 0
    #: Lines that could not go in yet: the model's backlog is at queue.max_backlog.
    held_back: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.failed


@dataclasses.dataclass
class Batch:
    """One batch file and where its lines go. ``deadline`` (epoch s): lines not done by then end
    expired (OpenAI's completion window); None: no deadline."""

    id: str
    input: Path
    output: Path
    errors: Path
    lines: int
    deadline: float | None = None
    #: Model for lines whose body names none.
    default_model: str | None = None
    #: The one ``url`` its lines may name (OpenAI's batch ``endpoint``); None: any of ``ENDPOINTS``.
    endpoint: str | None = None


def fingerprint(path: Path) -> tuple[str, int]:
    """(sha256 of the file's bytes, its number of non-blank lines), in one streaming pass."""
    digest = hashlib.sha256()
    lines = 0
    with path.open("rb") as f:
        for raw in f:
            digest.update(raw)
            if raw.strip():
                lines += 1
    return digest.hexdigest(), lines


def batch_id_for(digest: str) -> str:
    """A file's batch id, from its content's sha256: the same file run again is the same batch."""
    return f"batch_{digest[:24]}"


def check_batch_id(batch_id: str) -> str:
    if not batch_id or len(batch_id) > MAX_BATCH_ID or not all(c.isalnum() or c in "_.:" for c in batch_id):
        raise BatchError(f"batch id {batch_id!r}: use 1-{MAX_BATCH_ID} characters of A-Z a-z 0-9 _ . : "
                         "(it prefixes the ids of the batch's jobs)")
    return batch_id


# -- output lines ------------------------------------------------------------------------


def output_line(batch_id: str, line: int, custom_id: str | None, *, status: int | None = None,
                body: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bytes:
    """One output or error file line. ``status`` None: the request never reached a model (the
    line was unreadable, the batch expired or was cancelled first): ``response`` is null."""
    job_id = keys.batch_job_id(batch_id, line)
    response = None if status is None else {"status_code": status, "request_id": f"vqueue-batch-{job_id}",
                                            "body": body}
    record = {"id": f"vqueue-{job_id}", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def line_of_output(raw: bytes, batch_id: str) -> int | None:
    """The input line of batch ``batch_id`` an output line answers (from its ``id``); None: the
    line is not one of ours; ``BatchError`` if it answers another batch."""
    try:
        record_id = json.loads(raw)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(record_id, str) or not record_id.startswith("vqueue-"):
        return None
    job_id = record_id[len("vqueue-"):]
    line = keys.batch_line_of(job_id)
    if line is None or job_id != keys.batch_job_id(batch_id, line):
        raise BatchError(f"it holds answers of another batch ({record_id!r}, not of {batch_id}): give this "
                         "batch output files of its own")
    return line


def recover(path: Path, batch_id: str) -> tuple[set[int], int]:
    """The input lines ``path`` already answers, and how many of its lines say ``completed``
    (status 200). A last line without its newline (cut short by a crash) is cut off."""
    done: set[int] = set()
    ok = 0
    if not path.exists():
        return done, ok
    with path.open("rb+") as f:
        good_end = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            good_end += len(raw)
            try:
                line = line_of_output(raw, batch_id)
            except BatchError as exc:
                raise BatchError(f"{path}: {exc}") from None
            if line is not None:
                done.add(line)
                if b'"status_code":200,' in raw:
                    ok += 1
        f.truncate(good_end)
    return done, ok


# -- input lines ---------------------------------------------------------------------------


@dataclasses.dataclass
class Line:
    index: int
    custom_id: str | None
    url: str = ""
    job: AnyJob | None = None
    #: Why the line cannot run (then ``job`` is None): OpenAI's error object.
    error: dict[str, Any] | None = None
    #: The request's ``logprobs`` top-n, for a chat response's layout.
    top_n: int = 0


def parse_line(batch: Batch, index: int, raw: bytes, priority: int) -> Line:
    """Line ``index`` as a job, or the error that names what is wrong with it."""

    def bad(code: str, message: str, param: str | None = None, custom_id: str | None = None) -> Line:
        return Line(index, custom_id, error={"code": code, "message": f"line {index + 1}: {message}",
                                             "param": param, "line": index + 1})

    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return bad("invalid_json_line", f"not JSON ({exc})")
    if not isinstance(request, dict):
        return bad("invalid_json_line", "not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("invalid_request", "`custom_id` must be a non-empty string", "custom_id")
    if request.get("method", "POST") != "POST":
        return bad("invalid_request", f"`method` must be POST, not {request.get('method')!r}", "method", custom_id)
    url = request.get("url")
    kind = ENDPOINTS.get(url) if isinstance(url, str) else None
    if kind is None:
        return bad("invalid_url", f"`url` {url!r} is not one vqueue runs: {', '.join(ENDPOINTS)}", "url", custom_id)
    if batch.endpoint is not None and url != batch.endpoint:
        return bad("invalid_url", f"`url` {url!r} differs from the batch's endpoint {batch.endpoint!r}; put the "
                   "lines of each endpoint in a batch of their own", "url", custom_id)
    body = request.get("body")
    if not isinstance(body, dict):
        return bad("invalid_request", "`body` must be a JSON object (the request of `url`)", "body", custom_id)
    try:
        parsed = kind.model_validate(body)
        if parsed.stream:
            raise bad_request("stream", "a batch line cannot stream; leave `stream` unset")
        model = parsed.model or batch.default_model
        if model is None:
            raise bad_request("model", "`model` is required (or give the batch a default model)")
        job = parsed.job(keys.batch_job_id(batch.id, index), model)
    except ValidationError as exc:
        error = validation_error(exc)
        return bad("invalid_request", error.message, f"body.{error.param}" if error.param else "body", custom_id)
    except ApiError as exc:
        return bad("invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body", custom_id)
    updates: dict[str, Any] = {}
    if parsed.priority is None:
        updates["priority"] = priority
    if batch.deadline is not None and parsed.timeout_s is None:
        updates["deadline"] = batch.deadline
    if updates:
        job = job.model_copy(update=updates)
    top_n = (job.sampling.top_logprobs or 0) if isinstance(parsed, ChatCompletionRequest) else 0
    return Line(index, custom_id, url, job, top_n=top_n)


def read_lines(path: Path, skip: set[int]) -> Iterator[tuple[int, bytes]]:
    """The input's lines not in ``skip``, with their 0-based index; blank lines are skipped
    (as ``vllm run-batch`` does) and count as answered."""
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if index in skip or not raw.strip():
                continue
            yield index, raw


# -- the runner ------------------------------------------------------------------------------


class Lease:
    """One runner per batch: ``vqueue:batch:<id>:owner`` held with SET NX and renewed."""

    def __init__(self, r: redis.Redis, batch_id: str, lease_s: int, owner: str | None = None) -> None:
        self._redis = r
        self._key = keys.batch_owner_key(batch_id)
        self._lease_s = lease_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renewed = 0.0

    def take(self) -> bool:
        """Take the lease if it is free, or if its holder was a process of this host that is
        gone (a CLI killed a moment ago: running it again goes on at once, not after lease_s)."""
        if self._redis.set(self._key, self.owner, nx=True, ex=self._lease_s):
            self._renewed = time.monotonic()
            return True
        holder = self.holder()
        if holder is None or not _dead_here(holder):
            return False
        if self._redis.eval(_TAKE_OVER, 1, self._key, holder, self.owner, self._lease_s):
            self._renewed = time.monotonic()
            return True
        return False

    def holder(self) -> str | None:
        raw = self._redis.get(self._key)
        return raw.decode() if raw is not None else None

    def renew(self) -> None:
        """Renew it if a third of it has passed; ``BatchBusy`` if another runner took it over
        (this one stalled past its lease)."""
        if time.monotonic() - self._renewed < self._lease_s / 3:
            return
        # Only our own lease: compare and renew in one step.
        renewed = self._redis.eval(_RENEW, 1, self._key, self.owner, self._lease_s)
        if not renewed:
            raise BatchBusy(f"lost the batch's lease to {self.holder()!r}; it runs the batch now")
        self._renewed = time.monotonic()

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):  # else it runs out by itself
            self._redis.eval(_RELEASE, 1, self._key, self.owner)


def _dead_here(holder: str) -> bool:
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Outputs:
    """The output and error files, appended to; flushed at every write, fsync'ed now and then."""

    def __init__(self, batch: Batch, fsync_every_s: float) -> None:
        self._files = {True: batch.output.open("ab"), False: batch.errors.open("ab")}
        self._fsync_every_s = fsync_every_s
        self._synced = time.monotonic()

    def write(self, ok: bool, line: bytes) -> None:
        f = self._files[ok]
        f.write(line)
        f.flush()

    def sync(self, force: bool = False) -> None:
        if force or time.monotonic() - self._synced >= self._fsync_every_s:
            for f in self._files.values():
                os.fsync(f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self.sync(force=True)
        for f in self._files.values():
            f.close()


#: A batch's statuses, as OpenAI's Batch API names them; the last four are final.
FINAL = ("completed", "failed", "expired", "cancelled")


class BatchState:
    """A batch's record in Redis (``vqueue:batch:<id>``, a hash of strings): ``status``,
    ``lines``, ``completed`` / ``failed``, ``created_at`` / ``in_progress_at`` / ``<final
    status>_at``, ``deadline``, and whatever its creator adds (the gateway: file ids). The
    runner writes it; ``vqueue batch status``, ``vqueue batch cancel`` and ``/v1/batches``
    read it."""

    def __init__(self, r: redis.Redis, batch_id: str, result_ttl_s: int) -> None:
        self._redis = r
        self.key = keys.batch_key(batch_id)
        self._ttl_s = result_ttl_s

    def read(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self._redis.hgetall(self.key).items()}

    def create(self, fields: dict[str, str | int | float]) -> bool:
        """Write a new batch's record; False if one exists (a run again: kept as it is)."""
        created = self._redis.hsetnx(self.key, "created_at", repr(time.time()))
        if created:
            self._redis.hset(self.key, mapping={"status": "validating", **fields})
        return bool(created)

    def start(self, lines: int) -> None:
        self._redis.hsetnx(self.key, "in_progress_at", repr(time.time()))
        self._redis.hset(self.key, mapping={"lines": lines})
        # Not over a cancel asked for while no runner ran: that one stands.
        self._redis.eval(_SET_STATUS_UNLESS, 1, self.key, "in_progress", "cancelling", *FINAL)

    def submitted_through(self, line: int) -> None:
        """Lines up to ``line`` (file line index) may have jobs: what ``cancel_batch`` cancels."""
        self._redis.eval(_SET_MAX, 1, self.key, "submitted_through", line)

    def status(self) -> str | None:
        raw = self._redis.hget(self.key, "status")
        return raw.decode() if raw is not None else None

    def counts(self, progress: Progress) -> None:
        self._redis.hset(self.key, mapping={"completed": progress.completed, "failed": progress.failed})

    def finish(self, status: str, progress: Progress) -> None:
        now = repr(time.time())
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping={"status": status, f"{status}_at": now, "finalizing_at": now,
                                         "completed": progress.completed, "failed": progress.failed})
            pipe.expire(self.key, self._ttl_s)
            pipe.execute()


_SET_MAX = """
local now = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > now then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
_SET_STATUS_UNLESS = """
local now = redis.call('HGET', KEYS[1], 'status')
for i = 2, #ARGV do if now == ARGV[i] then return 0 end end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
"""


def cancel_batch(client: Client, batch_id: str) -> str:
    """Cancel a batch: its queued jobs never run, its running ones are aborted, and its runner
    (now, or the next one) writes what finished and ends it ``cancelled``. Says what it did."""
    state = BatchState(client.redis, batch_id, client.settings.redis.result_ttl_s)
    record = state.read()
    if not record:
        return f"batch {batch_id}: unknown (never run here, or ended more than redis.result_ttl_s ago)"
    # Compare and set: a batch that ended a moment ago stays as it ended.
    if not client.redis.eval(_SET_STATUS_UNLESS, 1, state.key, "cancelling", *FINAL):
        return f"batch {batch_id}: already {state.status()}; nothing to cancel"
    client.redis.hset(state.key, "cancelling_at", repr(time.time()))
    # Every job its runners submitted (lines in file order, blank ones included in the count).
    submitted = int(record.get("submitted_through", -1)) + 1
    ids = [keys.batch_job_id(batch_id, i) for i in range(submitted)]
    for start in range(0, len(ids), 1000):
        client.cancel_many(ids[start:start + 1000])
    return f"batch {batch_id}: cancelling ({record.get('lines', '?')} lines); its runner ends it with what finished"


class BatchRunner:
    """Runs one batch to its end: submits its lines (at most ``batch.window`` in flight), writes
    each outcome once, keeps the batch's record (``BatchState``) and returns the final
    ``Progress``. ``stop()`` (from another thread, or a signal handler) makes ``run`` return
    soon, leaving the jobs in flight running: run it again to go on.

    :param on_progress: called after every tick, from ``run``'s thread.
    """

    def __init__(self, client: Client, batch: Batch, *, priority: int | None = None,
                 on_progress: Callable[[Progress], None] | None = None, lease_owner: str | None = None) -> None:
        self.client = client
        self.batch = batch
        self.settings = client.settings
        self.priority = self.settings.queue.batch_priority if priority is None else priority
        self.on_progress = on_progress or (lambda progress: None)
        self.lease = Lease(client.redis, batch.id, self.settings.batch.lease_s, lease_owner)
        self.state = BatchState(client.redis, batch.id, self.settings.redis.result_ttl_s)
        self._stop = False
        #: In flight: job id -> its line.
        self._lines: dict[str, Line] = {}

    def stop(self) -> None:
        self._stop = True

    def run(self) -> Progress:
        if not self.lease.take():
            raise BatchBusy(f"batch {self.batch.id} is being run by {self.lease.holder()!r}; wait for it to end, "
                            f"or until {self.settings.batch.lease_s} s after that runner died")
        try:
            return self._run()
        finally:
            self.lease.release()

    def _run(self) -> Progress:
        batch = self.batch
        done_out, completed = recover(batch.output, batch.id)
        done_err, _ = recover(batch.errors, batch.id)
        self.state.create({"deadline": repr(batch.deadline) if batch.deadline else ""})
        self.state.start(batch.lines)
        progress = Progress(total=batch.lines, completed=completed, failed=len(done_err))
        outputs = _Outputs(batch, self.settings.batch.fsync_every_s)
        lines = read_lines(batch.input, done_out | done_err)
        held: list[Line] = []  # parsed, not yet submitted (the backlog was full)
        exhausted = False
        cancelling = False
        try:
            with self.client.watcher() as watcher:
                while not self._stop:
                    self.lease.renew()
                    if not cancelling and self.state.status() == "cancelling":
                        cancelling = True
                        self._cancel_in_flight()
                    if cancelling:
                        # Nothing more goes in: what was never submitted ends cancelled now.
                        for line in [*held, *(parse_line(batch, i, raw, self.priority) for i, raw in lines)]:
                            self._write_unrun(outputs, progress, line, "batch_cancelled", "the batch was cancelled")
                        held = []
                        exhausted = True
                    else:
                        exhausted = self._fill(held, lines, outputs, progress, watcher) or exhausted
                    progress.in_flight = len(self._lines)
                    progress.held_back = len(held)
                    self.state.counts(progress)
                    self.on_progress(progress)
                    if exhausted and not held and not self._lines:
                        break
                    if self._past_window():
                        self._expire_in_flight(outputs, progress)
                    if watcher.pending:
                        for outcome in watcher.wait(TICK_S):
                            self._write_outcome(outputs, progress, outcome)
                    else:
                        time.sleep(TICK_S)  # all held back by a full backlog: wait for room
                    outputs.sync()
        finally:
            outputs.close()
        progress.in_flight = len(self._lines)
        if not self._stop:
            expired = batch.deadline is not None and time.time() >= batch.deadline and progress.failed > 0
            self.state.finish("cancelled" if cancelling else "expired" if expired else "completed", progress)
        self.on_progress(progress)
        return progress

    def _fill(self, held: list[Line], lines: Iterator[tuple[int, bytes]], outputs: _Outputs, progress: Progress,
              watcher: OutcomeWatcher) -> bool:
        """Top the window up; True once the input is read to its end."""
        exhausted = False
        room = self.settings.batch.window - len(self._lines) - len(held)
        expired = self.batch.deadline is not None and time.time() >= self.batch.deadline
        while room > 0:
            try:
                index, raw = next(lines)
            except StopIteration:
                exhausted = True
                break
            line = parse_line(self.batch, index, raw, self.priority)
            if line.job is None:
                self._write_unrun(outputs, progress, line, "", "")
                continue
            if expired:
                self._write_unrun(outputs, progress, line, "batch_expired", EXPIRED_MESSAGE)
                continue
            held.append(line)
            room -= 1
        if held:
            self.state.submitted_through(held[-1].index)
            try:
                self.client.submit_new(line.job for line in held if line.job is not None)
                taken = len(held)
            except QueueFull as full:
                # The backlog is at its bound: what fits goes in now, the rest waits, in order.
                taken = max(0, full.limit - full.depth)
                try:
                    self.client.submit_new(line.job for line in held[:taken] if line.job is not None)
                except (QueueFull, RedisFull):
                    taken = 0
            except RedisFull:
                taken = 0  # Redis at its maxmemory: nothing of this transaction went in; try again next tick
            for line in held[:taken]:
                assert line.job is not None
                self._lines[line.job.id] = line
            # Those just submitted and those a run before this one had submitted (it crashed
            # before their outcomes): all come the same way.
            watcher.add(line.job.id for line in held[:taken] if line.job is not None)
            del held[:taken]
        return exhausted

    def _past_window(self) -> bool:
        """Past the deadline by more than the grace the workers get to expire its jobs."""
        return bool(self._lines) and self.batch.deadline is not None \
            and time.time() >= self.batch.deadline + EXPIRY_GRACE_S

    def _expire_in_flight(self, outputs: _Outputs, progress: Progress) -> None:
        """Lines still out after the window (queued where no worker takes them): cancelled in
        Redis so that they never run, and written expired."""
        self._cancel_in_flight()
        for line in list(self._lines.values()):
            self._write_unrun(outputs, progress, line, "batch_expired", EXPIRED_MESSAGE)
        self._lines.clear()

    def _cancel_in_flight(self) -> None:
        ids = list(self._lines)
        for start in range(0, len(ids), 1000):
            self.client.cancel_many(ids[start:start + 1000])

    def _write_unrun(self, outputs: _Outputs, progress: Progress, line: Line, code: str, message: str) -> None:
        error = line.error or {"code": code, "message": message}
        outputs.write(False, output_line(self.batch.id, line.index, line.custom_id, error=error))
        progress.failed += 1

    def _write_outcome(self, outputs: _Outputs, progress: Progress, outcome: JobResult | JobFailed) -> None:
        job_id = outcome.id if isinstance(outcome, JobResult) else outcome.job_id
        line = self._lines.pop(job_id, None)
        if line is None:
            return
        if isinstance(outcome, JobResult):
            created = int(outcome.timings.finished_at or time.time())
            if line.url == "/v1/chat/completions":
                body = chat_response(outcome, f"chatcmpl-{job_id}", created, system_fingerprint(), line.top_n)
            else:
                body = completion_response(outcome, f"cmpl-{job_id}", created, system_fingerprint())
            outputs.write(True, output_line(self.batch.id, line.index, line.custom_id, status=200, body=body))
            progress.completed += 1
            progress.completion_tokens += outcome.usage.completion_tokens
            return
        if isinstance(outcome, JobExpired) and outcome.partial is None:
            self._write_unrun(outputs, progress, line, "batch_expired", EXPIRED_MESSAGE)
            return
        if isinstance(outcome, JobCancelled) and outcome.partial is None:
            self._write_unrun(outputs, progress, line, "batch_cancelled", "the batch (or this job) was cancelled")
            return
        error = failure(outcome)
        outputs.write(False, output_line(self.batch.id, line.index, line.custom_id, status=error.status,
                                         error=error.body()))
        progress.failed += 1


#: After a batch's deadline, how long its runner leaves the jobs in flight to the workers (who
#: expire them, with their partial output) before it expires them itself.
EXPIRY_GRACE_S = 10.0
#: OpenAI's words for a line its batch's completion window left unrun.
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
