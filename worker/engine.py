"""The worker's handle on its one engine, which runs in a process of its own.

Celery's pool threads call ``EngineHolder.run_job``: the job's images are decoded here, in
the calling thread, then the job goes over a private socket to the engine process
(``worker.engine_process``), and the thread blocks until its result comes back. Every job
enters ``engine.generate`` there as soon as it arrives, so vLLM's scheduler batches all jobs
in flight at every step; nothing here forms batches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from producer.errors import EngineDead
from producer.protocol import ChatJob, CompletionJob, JobResult
from producer.settings import Settings
from worker import media
from worker.engine_process import STACKS_SIGNAL
from worker.framing import SyncChannel
from worker.models import resolve_model
from worker.results import JobStopped

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 60.0
#: A stop heard for a job not yet in the engine is kept this long for it: the job is between
#: its pickup and ``run_job`` (milliseconds), or it is not this worker's at all.
EARLY_STOP_TTL_S = 60.0
#: Stops kept at most before the old ones are dropped (every worker hears every cancel).
EARLY_STOPS_MAX = 10_000
#: How long the watchdog gives the engine process to print its threads' stacks before the kill.
STACKS_WAIT_S = 1.0


class EngineHolder:
    """Starts, feeds and stops the engine process.

    ``start()`` builds the engine (blocking), ``run_job()`` runs one job to its result
    (blocking, from any thread), ``stop()`` shuts the engine down. ``run_job`` raises
    ``InvalidJob`` for a job the engine refuses and ``EngineDead`` once the engine died.
    """

    def __init__(self, settings: Settings, blob_reader: media.BlobReader | None = None,
                 on_chunks: Callable[[list[tuple[str, dict[str, str]]]], None] | None = None,
                 on_engine_stats: Callable[[dict[str, float]], None] | None = None) -> None:
        self.settings = settings
        self._blob_reader = blob_reader or (lambda key: None)
        #: Takes the stream chunks of one engine step (each a job id and its entry's encoded
        #: fields), on the results reader thread: it must not block (``StreamWriter.add`` queues).
        self._on_chunks = on_chunks
        #: Takes the engine's own figures (``worker.engine_stats``), on the results reader thread.
        self._on_engine_stats = on_engine_stats
        self.dead = False
        self.multimodal = False
        self._proc: subprocess.Popen | None = None
        self._channel: SyncChannel | None = None
        self._reader = threading.Thread(target=self._read_results, name="vqueue-engine-results", daemon=True)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = False
        self._last_pong = time.monotonic()
        #: When the reader last read anything from the engine process: tells a silent engine
        #: (nothing at all) from a worker too busy to read its answers.
        self._last_frame = time.monotonic()
        #: Jobs handed to the engine process: job id -> its request number there.
        self._jobs: dict[str, int] = {}
        #: Stops heard for jobs not (yet) here: job id -> (why, when); kept ``EARLY_STOP_TTL_S``.
        self._early_stops: dict[str, tuple[str, float]] = {}
        self._watchdog = threading.Thread(target=self._watch_engine, name="vqueue-engine-watchdog", daemon=True)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        path = resolve_model(self.settings.model)
        ours, theirs = socket.socketpair()
        # A session of its own: a Ctrl-C meant for the worker must not reach the engine
        # before the worker's warm shutdown has let the jobs in flight finish.
        self._proc = subprocess.Popen([sys.executable, "-m", "worker.engine_process", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        self._channel = SyncChannel(ours)
        self._channel.send(("start", self.settings, str(path)))
        try:
            reply = self._channel.recv()
        except (EOFError, OSError):
            code = self._proc.wait()
            raise RuntimeError(f"the engine process exited with code {code} while starting; its log is above") from None
        if reply[0] != "ready":
            self._proc.wait(STOP_TIMEOUT_S)
            raise RuntimeError(reply[1])
        self.multimodal = reply[1]["multimodal"]
        self._last_pong = self._last_frame = time.monotonic()
        self._reader.start()
        self._watchdog.start()

    def stop(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        try:
            self._channel.send(("stop",))
            self._proc.wait(STOP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            if self._proc.poll() is None:
                log.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                self._proc.kill()
            self._proc.wait()
        # vLLM's own processes (EngineCore, its workers) live in the engine process's group;
        # if the engine process died first they are orphans that still hold the GPU's memory.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._channel.close()
        self._proc = None

    # -- jobs ----------------------------------------------------------------------------

    def run_job(self, job: CompletionJob | ChatJob, *, started_at: float, worker: str, attempt: int,
                enqueued_at: float | None = None) -> JobResult:
        """Run ``job`` to its result. A result whose ``outcome`` is not "succeeded" is the output
        of a job stopped in the engine; ``JobStopped`` means it was stopped before it got there.
        ``EngineDead.handed`` says whether the job was in the engine process when it died."""
        if self.dead or self._channel is None:
            raise EngineDead("the engine is not running; the job goes back to the queue")
        messages = None
        if isinstance(job, ChatJob):
            # Decoding and fetching images happens here, in the caller's thread, off the engine.
            max_images = self.settings.engine.limit_mm_per_prompt.get("image", 0)
            messages = media.prepare_messages(job, self.settings.images, max_images, self._blob_reader)
        future: Future = Future()
        request_id = next(self._ids)
        with self._lock:
            early = self._early_stops.pop(job.id, None)
            if early is None:
                self._pending[request_id] = future
                self._jobs[job.id] = request_id
        if early is not None:
            raise JobStopped(early[0])
        try:
            try:
                if self.dead:  # died between the check above and registering: nobody would answer
                    raise OSError("engine process gone")
                self._channel.send(("job", request_id, job, messages, started_at, worker, attempt, enqueued_at))
            except OSError:
                self._pending.pop(request_id, None)
                self.dead = True
                raise EngineDead("the engine process is gone; the job goes back to the queue") from None
            # Never an unbounded wait: a job may run for hours, but each slice of the wait ends
            # and checks that the engine is still alive (the watchdog fails every job otherwise).
            while True:
                try:
                    return future.result(timeout=self.settings.worker.engine_ping_timeout_s)
                except FutureTimeout:
                    if self.dead:
                        dead = EngineDead("the engine stopped answering; the job goes back to the queue")
                        dead.handed = True
                        raise dead from None
                except EngineDead as dead:
                    dead.handed = True
                    raise
        finally:
            with self._lock:
                if self._jobs.get(job.id) == request_id:
                    del self._jobs[job.id]

    def stop_job(self, job_id: str, reason: str) -> bool:
        """Stop a job ("cancelled", "expired"): aborted in the engine if it is there (its result is
        its output until then), else never run if it arrives within ``EARLY_STOP_TTL_S``.
        Returns whether the job was here."""
        with self._lock:
            request_id = self._jobs.get(job_id)
            if request_id is None:
                now = time.monotonic()
                self._early_stops[job_id] = (reason, now)
                if len(self._early_stops) > EARLY_STOPS_MAX:  # every worker hears every cancel
                    for old in [j for j, (_, at) in self._early_stops.items() if now - at > EARLY_STOP_TTL_S]:
                        del self._early_stops[old]
                return False
        try:
            self._channel.send(("stop-job", request_id, reason))
        except (OSError, AttributeError):
            return False  # the engine is gone; the job goes back to the queue and meets its cancel there
        return True

    def job_ids(self) -> list[str]:
        """The jobs in the engine now."""
        with self._lock:
            return list(self._jobs)

    def _watch_engine(self) -> None:
        """Ping the engine process on a schedule; one that stops answering is a dead one."""
        interval, timeout = self.settings.worker.engine_ping_interval_s, self.settings.worker.engine_ping_timeout_s
        for ping in itertools.count():
            time.sleep(interval)
            if self._stopping or self.dead:
                return
            now = time.monotonic()
            silent = now - self._last_pong
            if silent > timeout:
                self._dump_engine_stacks()
                self._declare_dead(f"the engine process has not answered for {silent:.0f} s "
                                   f"(worker.engine_ping_timeout_s = {timeout:g})",
                                   f"its last frame of any kind came {now - self._last_frame:.0f} s ago; "
                                   "its threads' stacks are above")
                return
            try:
                self._channel.send(("ping", ping))
            except OSError:
                return  # the reader sees the socket close and fails the jobs

    def _dump_engine_stacks(self) -> None:
        """Have the engine process print every thread's stack to the log (``faulthandler``, set up
        in ``worker.engine_process.main``): where a silent engine is stuck, before it is killed."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self._proc.pid, STACKS_SIGNAL)
            time.sleep(STACKS_WAIT_S)

    def _declare_dead(self, why: str, detail: str = "") -> None:
        """Fail every job in flight with EngineDead (they go back to the queue) and kill the engine;
        ``detail`` is for the log only."""
        log.error("%s; %sits jobs go back to the queue and the worker stops", why, f"{detail}; " if detail else "")
        self.dead = True
        with self._lock:
            orphans, self._pending = list(self._pending.values()), {}
        for future in orphans:
            future.set_exception(EngineDead(f"{why}; the job goes back to the queue"))
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _read_results(self) -> None:
        """One thread reads every result and wakes the pool thread that waits for it."""
        while True:
            try:
                kind, request_id, payload = self._channel.recv()
            except (EOFError, OSError):
                break
            self._last_frame = time.monotonic()
            if kind == "pong":
                self._last_pong = self._last_frame
                continue
            if kind == "chunks":
                # Before the jobs' "done" on this channel: their chunks are queued before their results.
                if self._on_chunks is not None:
                    try:
                        self._on_chunks(payload)
                    except Exception:  # a stream is never worth this thread, which every job needs
                        log.warning("could not queue %d stream chunks", len(payload), exc_info=True)
                continue
            if kind == "stats":
                if self._on_engine_stats is not None:
                    self._on_engine_stats(payload)
                continue
            if kind == "dead":
                self._declare_dead("the engine reports itself dead (vLLM's EngineCore errored)")
                continue
            with self._lock:
                future = self._pending.pop(request_id, None)
            if future is None:  # failed already by the watchdog
                continue
            if kind == "done":
                future.set_result(payload)
            else:
                if isinstance(payload, EngineDead):
                    self.dead = True
                future.set_exception(payload)
        if not self._stopping:
            code = self._proc.poll() if self._proc is not None else None
            log.error("the engine process ended (exit code %s); jobs in flight go back to the queue", code)
        self.dead = True
        with self._lock:
            orphans, self._pending = list(self._pending.values()), {}
        for future in orphans:
            future.set_exception(EngineDead("the engine process ended; the job goes back to the queue"))
