"""Mode "bare": the AsyncLLMEngine in-process, every request of a run submitted at once.

Run as its own process by bench.run (so that its engine's memory is gone before the next
mode starts). The engine is built from the same settings as the worker's
(``worker.engine_process.engine_args``), prompts go through the same renderer, and the PNG data
URIs of workload B are decoded in the timed window (as any program must): the engine's
own cost plus the unavoidable decoding, with nothing of a service around it.

    python -m bench.bare --preset cpu --workloads ABC --out FILE   (settings from VQUEUE_* env)
    python -m bench.bare --preset cpu --listen SOCKET   (bench.run: the engine stays up and runs
        each workload it is asked for, so that modes can take turns; see bench.run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from bench.measure import JobTiming, summarize
from bench.workloads import PRESETS, Workload, build_jobs
from producer import ChatJob, CompletionJob, get_settings
from worker import media, prompts, sampling
from worker.engine_process import engine_args
from worker.models import resolve_model


async def one(engine, job: CompletionJob | ChatJob, messages, max_model_len: int, t0: float) -> JobTiming:
    prompt = await prompts.render(engine.renderer, job, messages)
    params = sampling.to_sampling_params(job.sampling, prompts.prompt_length(prompt), max_model_len, {})
    final = None
    async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
        final = out
    end = time.perf_counter()
    stats = final.metrics
    return JobTiming(end - t0, len(final.prompt_token_ids), len(final.outputs[0].token_ids),
                     getattr(stats, "first_token_latency", None))


async def run_workload(engine, w: Workload, model: str, max_model_len: int, seed: int, n: int | None = None) -> dict:
    jobs = build_jobs(w, model, seed, n)
    settings = get_settings()
    limits, most = settings.images, settings.engine.limit_mm_per_prompt.get("image", 0)
    t0 = time.perf_counter()
    # The same jobs as the queue gets: images arrive as PNG data URIs and are decoded here,
    # inside the timed window, as a program calling the engine directly would have to.
    messages = [media.prepare_messages(j, limits, most, lambda key: None) if isinstance(j, ChatJob) else None
                for j in jobs]  # fmt: skip
    if w.concurrent:
        pairs = zip(jobs, messages, strict=True)
        timings = await asyncio.gather(*(one(engine, j, m, max_model_len, t0) for j, m in pairs))
    else:
        timings = []
        for j, m in zip(jobs, messages, strict=True):
            start = time.perf_counter()
            timings.append(await one(engine, j, m, max_model_len, start))
    return summarize(list(timings), time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict:
    from vllm import AsyncLLMEngine

    settings = get_settings()
    started = time.perf_counter()
    engine = AsyncLLMEngine.from_engine_args(engine_args(settings, str(resolve_model(settings.model))))
    out = {"engine_start_s": round(time.perf_counter() - started, 1), "workloads": {}}
    try:
        for name in args.workloads:
            w = PRESETS[args.preset][name]
            await run_workload(engine, w, settings.model.served_name, settings.engine.max_model_len, seed=1000, n=8)
            out["workloads"][name] = await run_workload(engine, w, settings.model.served_name,
                                                        settings.engine.max_model_len, seed=args.seed)
            print(f"bare {name}: {out['workloads'][name]}", flush=True)
    finally:
        engine.shutdown()
    return out


async def listen(address: str) -> None:
    """Build the engine, then answer bench.run's requests on a Unix socket until it says stop:
    ``("run", workload, seed, n)`` -> the run's summary; the socket appears once the engine is up."""
    from multiprocessing.connection import Listener

    from vllm import AsyncLLMEngine

    settings = get_settings()
    engine = AsyncLLMEngine.from_engine_args(engine_args(settings, str(resolve_model(settings.model))))
    loop = asyncio.get_running_loop()
    try:
        with Listener(address, family="AF_UNIX") as listener:
            conn = await loop.run_in_executor(None, listener.accept)
            while True:
                request = await loop.run_in_executor(None, conn.recv)
                if request[0] == "stop":
                    break
                _, w, seed, n = request
                conn.send(await run_workload(engine, w, settings.model.served_name, settings.engine.max_model_len,
                                             seed=seed, n=n))  # fmt: skip
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--workloads", default="ABC")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--listen", help="a Unix socket path: serve bench.run's requests (see listen())")
    args = parser.parse_args()
    if args.listen:
        asyncio.run(listen(args.listen))
        return
    result = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
