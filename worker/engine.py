"""The worker process's one vLLM engine, on an asyncio loop in its own thread.

Celery's pool threads call ``EngineHolder.run_job``, which hands the job to the loop and
blocks on its future. Every job enters ``engine.generate`` as soon as it is dequeued, so
vLLM's scheduler batches all jobs in flight at every step; nothing here forms batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from producer.errors import EngineDead, InvalidJob
from producer.protocol import ChatJob, CompletionJob, JobResult
from producer.settings import Settings
from worker import media, prompts, results, sampling
from worker.models import resolve_model

log = logging.getLogger(__name__)


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


class EngineHolder:
    """Owns one ``AsyncLLMEngine`` and the event loop it runs on.

    ``start()`` builds the engine (blocking), ``run_job()`` runs one job to its result
    (blocking, from any thread), ``stop()`` shuts the engine down. ``run_job`` raises
    ``InvalidJob`` for a job the engine refuses and ``EngineDead`` once the engine died.
    """

    def __init__(self, settings: Settings, blob_reader: media.BlobReader | None = None) -> None:
        self.settings = settings
        self._blob_reader = blob_reader or (lambda key: None)
        self.engine: Any = None
        self.model_defaults: dict[str, Any] = {}
        self.dead = False
        self.multimodal = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vqueue-engine-loop", daemon=True)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        from vllm import AsyncLLMEngine

        path = resolve_model(self.settings.model)
        args = engine_args(self.settings, str(path))
        self._thread.start()
        started = time.monotonic()

        async def build() -> Any:
            # Built inside the loop so that the engine's output handler lives on it.
            return AsyncLLMEngine.from_engine_args(args)

        self.engine = self._call(build()).result()
        self.model_defaults = self.engine.model_config.get_diff_sampling_param()
        self.multimodal = bool(self.engine.model_config.is_multimodal_model)
        log.info("engine ready for %r in %.1f s (max_model_len %d, max_num_seqs %d, model defaults %s)",
                 self.settings.model.served_name, time.monotonic() - started, self.settings.engine.max_model_len,
                 self.settings.engine.max_num_seqs, self.model_defaults or "none")
        self._call(self._log_stats_forever())

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def _call(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _log_stats_forever(self) -> None:
        # AsyncLLM logs its counters (running / waiting requests, throughput) only when asked.
        while self.engine is not None and not self.dead:
            await asyncio.sleep(self.settings.worker.log_stats_interval_s)
            try:
                await self.engine.do_log_stats()
            except Exception:
                log.debug("do_log_stats failed", exc_info=True)

    # -- jobs ----------------------------------------------------------------------------

    def run_job(self, job: CompletionJob | ChatJob, *, started_at: float, worker: str, attempt: int) -> JobResult:
        if self.dead or self.engine is None:
            raise EngineDead("the engine is not running; the job goes back to the queue")
        messages = None
        if isinstance(job, ChatJob):
            # Decoding and fetching images happens here, in the caller's thread, off the engine loop.
            messages = media.prepare_messages(job, self.settings.images, self._max_images(), self._blob_reader)
        return self._call(self._run_job(job, messages, started_at=started_at, worker=worker, attempt=attempt)).result()

    def _max_images(self) -> int:
        return self.settings.engine.limit_mm_per_prompt.get("image", 0)

    async def _run_job(self, job: CompletionJob | ChatJob, messages: list[dict[str, Any]] | None, *,
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
            self.dead = True
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
