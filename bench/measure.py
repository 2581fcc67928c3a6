"""What every mode records per job, and the figures computed from it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class JobTiming:
    latency_s: float  # from the run's start (or the job's own submit, in workload C) to its result
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None  # to the first output token, where the mode can see it


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(jobs: list[JobTiming], wall_s: float) -> dict:
    prompt = sum(j.prompt_tokens for j in jobs)
    output = sum(j.completion_tokens for j in jobs)
    lat = [j.latency_s for j in jobs]
    ttft = [j.ttft_s for j in jobs if j.ttft_s is not None]
    return {
        "jobs": len(jobs),
        "wall_s": round(wall_s, 4),
        "jobs_per_s": round(len(jobs) / wall_s, 2),
        "output_tokens_per_s": round(output / wall_s, 1),
        "total_tokens_per_s": round((prompt + output) / wall_s, 1),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "latency_p50_s": round(statistics.median(lat), 5),
        "latency_p99_s": round(_pct(lat, 0.99), 5),
        "ttft_p50_s": round(statistics.median(ttft), 5) if ttft else None,
        "ttft_p99_s": round(_pct(ttft, 0.99), 5) if ttft else None,
    }
