"""The engine process: one ``AsyncLLMEngine`` on one asyncio loop, fed by the worker.

Why a process of its own: vLLM's front end (output processing and detokenisation of every
sequence at every step) is Python that holds the GIL for long stretches. In the Celery
worker's process it starved Celery's consumer thread, so jobs reached the engine slowly
(on an H100, 1000 jobs ran at 0.63 of the bare engine's speed; two worker processes on the
same GPU ran 1.97x one). Here the front end has a process and a GIL to itself and, like
``vllm serve``'s, runs on a single asyncio loop: jobs arrive on a socket, every job becomes
``engine.generate`` at once (vLLM's scheduler batches all of them at every step), and each
result goes back the moment it is final.

    started by worker.engine.EngineHolder:  python -m worker.engine_process FD
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from producer import streams
from producer.errors import EngineError, InvalidJob
from producer.protocol import ChatJob, CompletionJob, JobResult, StreamChunk
from producer.settings import Settings
from worker import engine_stats, failures, prompts, results, sampling
from worker.framing import AsyncChannel
from worker.results import JobStopped

log = logging.getLogger("vqueue.engine")

#: On this signal the engine process prints every thread's stack (``faulthandler``, from C, so
#: also while its loop is stuck): the worker's watchdog sends it before it kills a silent engine.
STACKS_SIGNAL = signal.SIGUSR1


#: ``extra_args`` keys with which an operator has chosen the CUDA-graph sizes; then vqueue keeps out.
_GRAPH_KEYS = ("compilation_config", "max_cudagraph_capture_size", "cudagraph_capture_sizes")


def cudagraph_capture_size(max_num_seqs: int) -> int:
    """The largest decode batch to capture as a CUDA graph: the whole batch.

    vLLM captures graphs only up to ``min(2 x max_num_seqs, 512)`` by default (0.26; 0.32 the
    same, 1024 on data-centre Blackwell), so a decode step of more sequences launches every
    kernel from Python and the GPU waits on the host. On an H200 with 1024 sequences (workload
    A, shared/gpu/README.md) capturing up to 1024 made the bare engine 1.73x and 1.96x faster
    in two same-call comparisons (SM busy 12-39 % -> 57-71 %). Cost: capture took ~7 s instead
    of ~5 s at start and 0.84 GiB of GPU memory instead of 0.51 (taken from the KV cache).
    vLLM's sizes run in steps of 8 up to 256 and 16 above, and a size between steps is
    truncated down (the last batch sizes then run eagerly): round up. vLLM also caps it at
    ``max_num_batched_tokens``.
    """
    step = 8 if max_num_seqs <= 256 else 16
    return -(-max_num_seqs // step) * step


def engine_env(settings: Settings) -> None:
    """Environment the engine's front end reads, set (unless the operator set it) before it starts.

    ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`` (vllm/envs.py in 0.26 and 0.32, default 128): the output
    handler processes a step's outputs in chunks of this many and yields to the loop between
    chunks. At 128 a 1024-sequence step is 8 slices with a loop turn between each; this process's
    loop serves nothing else that is latency-critical while the step's outputs wait, so process
    the whole batch at once.
    """
    os.environ.setdefault("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", str(max(128, settings.engine.max_num_seqs)))


def engine_args(settings: Settings, model_path: str) -> Any:
    """vLLM's engine arguments from the settings, with vqueue's throughput defaults.

    - CUDA graphs up to the batch (``cudagraph_capture_size``), unless ``engine.extra_args``
      chooses graph sizes itself; moot with ``enforce_eager`` (no graphs) and on a CPU.
    - Prefix caching and chunked prefill are left to vLLM: its V1 engine turns both on by
      default for every model that supports them (``_set_default_chunked_prefill_and_prefix_caching_args``
      in 0.26 and 0.32; Qwen2-VL supports both). Chunked prefill lets a long prompt share a step
      with the decodes of 1000 others (``max_num_batched_tokens`` per step); prefix caching costs a
      hash per 16-token block and pays whenever jobs share a system prompt or an image. Neither
      measured on or off here yet (set ``enable_prefix_caching`` / ``enable_chunked_prefill`` in
      ``engine.extra_args`` to compare).
    """
    from vllm import AsyncEngineArgs

    engine_env(settings)
    return AsyncEngineArgs(**engine_kwargs(settings, model_path))


def engine_kwargs(settings: Settings, model_path: str) -> dict[str, Any]:
    """The keyword arguments of ``engine_args`` as plain data (no vLLM import): what the
    benchmark records and hands ``vllm serve`` as flags, so both run the same engine."""
    e = settings.engine
    extra = dict(e.extra_args)
    extra.setdefault("scheduling_policy", "priority")  # job control (issue 10): jobs' priority inside vLLM
    if not e.enforce_eager and not any(k in extra for k in _GRAPH_KEYS):
        extra["compilation_config"] = {"max_cudagraph_capture_size": cudagraph_capture_size(e.max_num_seqs)}
    return dict(
        model=model_path,
        served_model_name=settings.model.served_name,
        max_model_len=e.max_model_len,
        dtype=e.dtype,
        gpu_memory_utilization=e.gpu_memory_utilization,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        enforce_eager=e.enforce_eager,
        seed=e.seed,
        load_format=e.load_format,
        limit_mm_per_prompt=e.limit_mm_per_prompt,
        **extra,
    )


class EngineRunner:
    """One engine and the jobs it runs; every method runs on the process's one loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Any = None
        self.model_defaults: dict[str, Any] = {}
        self.priority_scheduling = False
        #: The jobs in this process, by the worker's request number.
        self.live: dict[int, Live] = {}
        #: Stops that arrived before their job (the worker sends both at once): number -> (why, when).
        self.early_stops: dict[int, tuple[str, float]] = {}
        #: vLLM's own figures (running, waiting, KV cache), fed by its stat loggers, for the worker's metrics.
        self.engine_totals = engine_stats.EngineTotals()

    def start(self, model_path: str) -> dict[str, Any]:
        from vllm import AsyncLLMEngine

        started = time.monotonic()
        # Built inside the running loop so that the engine's output handler lives on it.
        tap = engine_stats.stat_logger_class(self.engine_totals)
        self.engine = AsyncLLMEngine.from_engine_args(engine_args(self.settings, model_path),
                                                      stat_loggers=[tap] if tap is not None else None)
        self.model_defaults = self.engine.model_config.get_diff_sampling_param()
        self.priority_scheduling = str(getattr(self.engine.vllm_config.scheduler_config, "policy", "fcfs")) \
            .lower().endswith("priority")
        log.info("engine ready for %r in %.1f s (max_model_len %d, max_num_seqs %d, model defaults %s)",
                 self.settings.model.served_name, time.monotonic() - started, self.settings.engine.max_model_len,
                 self.settings.engine.max_num_seqs, self.model_defaults or "none")
        return {"multimodal": bool(self.engine.model_config.is_multimodal_model)}

    def errored(self) -> bool:
        return bool(self.engine is not None and getattr(self.engine, "errored", False))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def log_stats_forever(self) -> None:
        # AsyncLLM logs its counters (running / waiting requests, throughput) only when asked.
        while self.engine is not None:
            await asyncio.sleep(self.settings.worker.log_stats_interval_s)
            try:
                await self.engine.do_log_stats()
            except Exception:
                log.debug("do_log_stats failed", exc_info=True)

    def admit(self, number: int) -> Live:
        """Register the job the worker numbered ``number``; a stop that came first applies now."""
        live = self.live[number] = Live()
        early = self.early_stops.pop(number, None)
        if early is not None:
            live.reason = early[0]
        return live

    def stop(self, number: int, reason: str) -> None:
        """Stop a job ("cancelled", "expired"): vLLM's ``abort`` if it is generating (its output
        until then comes back as its result), else it never reaches ``generate``."""
        live = self.live.get(number)
        if live is None:  # its job frame is still on its way, or it just finished
            now = time.monotonic()
            self.early_stops[number] = (reason, now)
            for old in [n for n, (_, at) in self.early_stops.items() if now - at > EARLY_STOP_TTL_S]:
                del self.early_stops[old]
            return
        if live.reason is not None:
            return
        live.reason = reason
        if live.request_id is not None:
            asyncio.get_running_loop().create_task(self._abort(live))

    async def _abort(self, live: Live) -> None:
        """vLLM's ``abort`` for a stopped job. An abort that lands while ``generate`` is still
        adding the request finds nothing to abort, so it is repeated until the job has ended."""
        log.info("aborting %s (%s)", live.request_id, live.reason)
        while not live.done:
            try:
                await self.engine.abort(live.request_id)
            except Exception:  # the engine is dying: its jobs end with it, the worker sees to them
                log.warning("could not abort %s", live.request_id, exc_info=True)
                return
            await asyncio.sleep(ABORT_RETRY_S)

    async def run(self, job: CompletionJob | ChatJob, messages: list[dict[str, Any]] | None, *,
                  started_at: float, worker: str, attempt: int, live: Live | None = None,
                  enqueued_at: float | None = None,
                  on_chunk: Callable[[StreamChunk], None] | None = None) -> JobResult:
        """Run one job to its result; a streamed job (``job.stream``) also hands each step's
        new output to ``on_chunk`` as it comes."""
        live = live or Live()
        served = self.settings.model.served_name
        if job.model != served:
            raise InvalidJob("model", f"this worker serves {served!r}, not {job.model!r}; "
                             f"submit to model {served!r} or start a worker with model.served_name={job.model!r}")
        if self.settings.testing.hooks:
            test_hooks(job)
        timer = None
        if job.deadline is not None:
            # One timer per job on this loop: nothing polls; at the deadline vLLM aborts it.
            timer = asyncio.get_running_loop().call_later(max(0.0, job.deadline - time.time()),
                                                          self._expire, live, job.deadline)
        try:
            request_id = f"{job.id}-{uuid.uuid4().hex[:8]}"  # unique even if a job is delivered twice
            prompt = await prompts.render(self.engine.renderer, job, messages)
            try:
                params = sampling.to_sampling_params(
                    job.sampling, prompts.prompt_length(prompt), self.settings.engine.max_model_len,
                    self.model_defaults, stream=job.stream,
                )
            except Exception as exc:
                raise failures.classify(exc, "sampling") from None
            if live.reason is not None:
                raise JobStopped(live.reason)
            extra = {}
            if self.priority_scheduling:
                # vLLM runs a lower number first; vqueue a higher one.
                extra["priority"] = 9 - (job.priority if job.priority is not None else 5)
            final = None
            # A streamed job's outputs are deltas: each becomes a chunk, and they are joined
            # here again for its result (vLLM merges the deltas of steps this loop fell behind).
            joiner = results.DeltaJoiner(sampling.top_logprobs(job.sampling) or 0, attempt) if job.stream else None
            live.request_id = request_id
            handed_at = time.time()
            try:
                async for output in self.engine.generate(prompt, params, request_id=request_id, **extra):
                    final = output
                    if joiner is not None:
                        chunk = joiner.add(output)
                        if chunk is not None and on_chunk is not None:
                            on_chunk(chunk)
            except Exception as exc:
                raise failures.classify(exc) from None
        finally:
            live.done = True
            if timer is not None:
                timer.cancel()
        if final is None or not final.finished:
            if live.reason is not None:  # an engine that ends an aborted request without a final output
                raise JobStopped(live.reason)
            raise EngineError(None, f"the engine ended request {request_id} without a final output")
        completions = joiner.completions() if joiner is not None else None
        aborted = any(c.finish_reason == "abort" for c in (completions or final.outputs))
        outcome = live.reason if aborted and live.reason is not None else "succeeded"
        return results.build_result(job, final, started_at=started_at, worker=worker, attempt=attempt,
                                    enqueued_at=enqueued_at, handed_at=handed_at, outcome=outcome,
                                    completions=completions)

    def _expire(self, live: Live, deadline: float) -> None:
        if live.done:
            return
        early = deadline - time.time()
        if early > 0:
            # asyncio's timers run on the monotonic clock and may fire up to its resolution
            # early; the deadline is wall-clock time, and a job is never expired before it.
            asyncio.get_running_loop().call_later(early, self._expire, live, deadline)
            return
        if live.reason is None:
            live.reason = "expired"
            if live.request_id is not None:
                asyncio.get_running_loop().create_task(self._abort(live))


#: How long a stop for a job not (yet) in this process is kept for it.
EARLY_STOP_TTL_S = 60.0
#: How often an abort is repeated until the aborted job has ended.
ABORT_RETRY_S = 0.25


class Live:
    """A job in the engine process: its vLLM request id once it is generating, and why it was
    stopped (None: it was not)."""

    __slots__ = ("done", "reason", "request_id")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.request_id: str | None = None
        self.done = False


def test_hooks(job: CompletionJob | ChatJob) -> None:
    """Faults on demand for vqueue's own tests (``testing.hooks``; see ``TestingSettings``)."""
    prompt = getattr(job, "prompt", None)
    if prompt == "vqueue-test:hang-engine":
        log.warning("testing.hooks: freezing the engine process's loop, as a hung engine would")
        time.sleep(10**6)
    if prompt == "vqueue-test:kill-engine":
        log.warning("testing.hooks: the engine process exits, as a crashing engine would")
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class ChunkBatcher:
    """Streamed jobs' chunks, sent to the worker as one frame per engine step.

    One frame per chunk cost a socket write each: with 64 jobs streaming, those writes were
    over a third of this process's time (py-spy), taken from the loop every job shares. The
    first chunk of a step schedules a flush (``call_soon``); the chunks of every job that
    the same step woke arrive before it runs, so the worker gets one frame per step.
    """

    def __init__(self, channel: AsyncChannel) -> None:
        self._channel = channel
        self._pending: list[tuple[str, dict[str, str]]] = []

    def add(self, job_id: str, chunk: StreamChunk) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        # Encoded here, as the entry's fields: a str crosses the channel for a tenth of what a
        # pickled model costs, and the worker's process (its GIL also feeds Celery's consumer)
        # only writes it.
        self._pending.append((job_id, streams.encode_chunk(chunk)))

    def flush(self) -> None:
        """Send what is pending now. Called before a job's "done" too: the worker queues a
        job's chunks for writing before it stores the result, and its stream end after."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._channel.send(("chunks", None, pending))


async def _run_one(runner: EngineRunner, channel: AsyncChannel, chunks: ChunkBatcher, request_id: int,
                   job: CompletionJob | ChatJob, *args: Any, **kwargs: Any) -> None:
    on_chunk = (lambda chunk: chunks.add(job.id, chunk)) if job.stream else None
    try:
        reply = ("done", request_id, await runner.run(job, *args, live=runner.admit(request_id), on_chunk=on_chunk,
                                                      **kwargs))  # fmt: skip
    except JobStopped as stopped:
        reply = ("error", request_id, stopped)
    except Exception as exc:
        reply = ("error", request_id, _portable(failures.classify(exc)))
    finally:
        runner.live.pop(request_id, None)
    chunks.flush()  # the job's last chunks before its end
    channel.send(reply)


async def serve(channel: AsyncChannel) -> None:
    """Start the engine the worker asks for, then run its jobs until it says stop or goes away."""
    _, settings, model_path = await channel.recv()
    runner = EngineRunner(settings)
    try:
        info = runner.start(model_path)
    except Exception as exc:
        traceback.print_exc()
        channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    channel.send(("ready", info))
    after_engine_ready()
    in_flight: set[asyncio.Task] = set()
    chunks = ChunkBatcher(channel)
    stats = asyncio.create_task(runner.log_stats_forever())
    figures = asyncio.create_task(engine_stats.send_forever(channel.send, runner.engine_totals,
                                                            settings.metrics.engine_stats_interval_s))
    try:
        while True:
            try:
                message = await channel.recv()
            except EOFError:
                log.warning("the worker is gone; stopping the engine")
                break
            if message[0] == "stop":
                break
            if message[0] == "ping":
                # Answered from the loop every job runs on: a loop that stopped turning (or an
                # engine that reports itself errored) stops answering, and the worker gives up.
                channel.send(("pong", message[1], None) if not runner.errored() else ("dead", message[1], None))
                continue
            if message[0] == "stop-job":
                runner.stop(message[1], message[2])
                continue
            _, request_id, job, messages, started_at, worker, attempt, enqueued_at = message
            task = asyncio.create_task(_run_one(runner, channel, chunks, request_id, job, messages,
                                                started_at=started_at, worker=worker, attempt=attempt,
                                                enqueued_at=enqueued_at))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
    finally:
        stats.cancel()
        figures.cancel()
        runner.shutdown()


#: Young-generation threshold after start (Python's default is 700 net allocations). A burst of
#: 1000 jobs makes some tens of thousands of container objects (job models, prompts, sampling
#: params, request states), nearly all freed by reference counting, none in cycles worth
#: chasing; at 700 the collector would run ~70 young and several older collections inside the
#: burst, each a pause of this loop that every job shares. 50,000 makes that about one; the
#: garbage it lets wait is bounded at a few MB. Older generations keep Python's ratios (10, 10),
#: and are cheap once the startup heap is frozen.
GC_THRESHOLDS = (50_000, 10, 10)


def after_engine_ready() -> None:
    """Call once the engine is built and warm (``serve``, after it sends "ready").

    As ``vllm serve`` does after start (``freeze_gc_heap`` in its lifespan, 0.26 and 0.32): move
    every object alive now -- modules, the engine, its tokenizer and renderer, hundreds of
    thousands of them -- out of the collector's reach, so no full collection walks them again;
    then raise the young threshold (``GC_THRESHOLDS``).
    """
    import gc

    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("startup heap frozen (%d objects); gc thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


def _run_loop(main_coro: Any) -> None:
    """uvloop where it is installed (a dependency of vLLM's server; ``vllm serve`` runs on it):
    its socket and callback paths are C, where asyncio's are Python on this hot loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
        return
    uvloop.run(main_coro)


def main(fd: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s: %(levelname)s/engine] %(message)s")
    # The worker decides when the engine stops (after its jobs in flight finish on a warm
    # shutdown); a Ctrl-C or SIGTERM sent to the whole group must not cut the jobs short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)

    async def run() -> None:
        channel = await AsyncChannel.from_socket(socket.socket(fileno=fd))
        try:
            await serve(channel)
        finally:
            channel.close()

    _run_loop(run())


if __name__ == "__main__":
    main(int(sys.argv[1]))
