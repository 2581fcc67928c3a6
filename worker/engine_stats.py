"""The engine's own state, taken from vLLM's stats in the engine process and sent to the worker.

vLLM hands every stat logger (``stat_loggers=`` of ``AsyncLLM.from_engine_args``; the
``StatLoggerBase`` interface of ``vllm/v1/metrics/loggers.py``, 0.26 and 0.32) the scheduler's
figures after each engine step: requests running and waiting, KV-cache usage, prefix-cache
lookups, and the step's preemptions. ``EngineTotals`` keeps the latest of the first three and
sums the others, as vLLM's own Prometheus logger does, so nothing here is re-derived. The
engine process sends a snapshot to the worker every ``metrics.engine_stats_interval_s`` (a
small "stats" frame on the channel jobs use), and the worker exports it (``worker.metrics``).
vLLM's own Prometheus metrics live in the engine process's registry, which nothing serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("vqueue.engine")

#: The snapshot's fields, each a number; the worker reads them by these names.
FIELDS = ("running", "waiting", "kv_cache_usage", "preemptions", "prefix_cache_queries", "prefix_cache_hits",
          "updated_at")


class EngineTotals:
    """vLLM's stats as they come (``record``, on the engine process's loop), and a snapshot of them."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.updated_at = time.time()

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            # vLLM 0.32 splits the waiting into those held back by capacity and those deferred
            # (its metric's "reason" label); both wait in the engine.
            self.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                self.prefix_cache_queries += prefix.queries
                self.prefix_cache_hits += prefix.hits
            self.updated_at = time.time()
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs

    def snapshot(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in FIELDS}


def stat_logger_class(totals: EngineTotals) -> type | None:
    """A vLLM stat logger class (its own factory) that feeds ``totals``; None where this vLLM
    has no ``StatLoggerBase`` (then the engine's figures are not exported)."""
    try:
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError:
        log.warning("this vLLM has no vllm.v1.metrics.loggers.StatLoggerBase: the engine's own figures "
                    "(running, waiting, KV cache) are not exported")
        return None

    class VqueueStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
            totals.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return VqueueStatLogger


async def send_forever(send: Any, totals: EngineTotals, interval_s: float) -> None:
    """Send a snapshot with ``send(frame)`` every ``interval_s``, until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            send(("stats", None, totals.snapshot()))
        except OSError:  # the worker is gone; the main loop notices and stops
            return
