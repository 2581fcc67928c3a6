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
import logging
import pickle
import signal
import socket
import sys
import time
import traceback
import uuid
from typing import Any

from producer.errors import EngineDead, InvalidJob
from producer.protocol import ChatJob, CompletionJob, JobResult
from producer.settings import Settings
from worker import prompts, results, sampling
from worker.framing import AsyncChannel

log = logging.getLogger("vqueue.engine")


def engine_args(settings: Settings, model_path: str) -> Any:
    from vllm import AsyncEngineArgs

    e = settings.engine
    return AsyncEngineArgs(
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
        **e.extra_args,
    )


class EngineRunner:
    """One engine and the jobs it runs; every method runs on the process's one loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Any = None
        self.model_defaults: dict[str, Any] = {}

    def start(self, model_path: str) -> dict[str, Any]:
        from vllm import AsyncLLMEngine

        started = time.monotonic()
        # Built inside the running loop so that the engine's output handler lives on it.
        self.engine = AsyncLLMEngine.from_engine_args(engine_args(self.settings, model_path))
        self.model_defaults = self.engine.model_config.get_diff_sampling_param()
        log.info("engine ready for %r in %.1f s (max_model_len %d, max_num_seqs %d, model defaults %s)",
                 self.settings.model.served_name, time.monotonic() - started, self.settings.engine.max_model_len,
                 self.settings.engine.max_num_seqs, self.model_defaults or "none")
        return {"multimodal": bool(self.engine.model_config.is_multimodal_model)}

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

    async def run(self, job: CompletionJob | ChatJob, messages: list[dict[str, Any]] | None, *,
                  started_at: float, worker: str, attempt: int) -> JobResult:
        from vllm.v1.engine.exceptions import EngineDeadError

        served = self.settings.model.served_name
        if job.model != served:
            raise InvalidJob("model", f"this worker serves {served!r}, not {job.model!r}; "
                             f"submit to model {served!r} or start a worker with model.served_name={job.model!r}")
        request_id = f"{job.id}-{uuid.uuid4().hex[:8]}"  # unique even if a job is delivered twice
        try:
            prompt = await prompts.render(self.engine.renderer, job, messages)
            params = self._sampling_params(job, prompts.prompt_length(prompt))
            final = None
            async for output in self.engine.generate(prompt, params, request_id=request_id):
                final = output
        except EngineDeadError as exc:
            # Unrecoverable: the job is not at fault, so it must not be failed for it.
            raise EngineDead(f"vLLM engine died: {exc}") from None
        except InvalidJob:
            raise
        except prompts.client_errors() as exc:
            raise InvalidJob(getattr(exc, "parameter", None) or "job", str(exc)) from None
        if final is None or not final.finished:
            raise RuntimeError(f"engine ended request {request_id} without a final output")
        return results.build_result(job, final, started_at=started_at, worker=worker, attempt=attempt)

    def _sampling_params(self, job: CompletionJob | ChatJob, prompt_tokens: int) -> Any:
        try:
            return sampling.to_sampling_params(
                job.sampling, prompt_tokens, self.settings.engine.max_model_len, self.model_defaults
            )
        except InvalidJob:
            raise
        except prompts.client_errors() as exc:
            raise InvalidJob("sampling", str(exc)) from None


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


async def _run_one(runner: EngineRunner, channel: AsyncChannel, request_id: int, *args: Any, **kwargs: Any) -> None:
    try:
        channel.send(("done", request_id, await runner.run(*args, **kwargs)))
    except Exception as exc:
        channel.send(("error", request_id, _portable(exc)))


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
    in_flight: set[asyncio.Task] = set()
    stats = asyncio.create_task(runner.log_stats_forever())
    try:
        while True:
            try:
                message = await channel.recv()
            except EOFError:
                log.warning("the worker is gone; stopping the engine")
                break
            if message[0] == "stop":
                break
            _, request_id, job, messages, started_at, worker, attempt = message
            task = asyncio.create_task(_run_one(runner, channel, request_id, job, messages,
                                                started_at=started_at, worker=worker, attempt=attempt))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
    finally:
        stats.cancel()
        runner.shutdown()


def main(fd: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s: %(levelname)s/engine] %(message)s")
    # The worker decides when the engine stops (after its jobs in flight finish on a warm
    # shutdown); a Ctrl-C or SIGTERM sent to the whole group must not cut the jobs short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def run() -> None:
        channel = await AsyncChannel.from_socket(socket.socket(fileno=fd))
        try:
            await serve(channel)
        finally:
            channel.close()

    asyncio.run(run())


if __name__ == "__main__":
    main(int(sys.argv[1]))
