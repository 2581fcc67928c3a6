"""``GET /metrics``: the backlog read from Redis, and the gateway's own HTTP requests.

Like ``vllm serve``'s ``/metrics``, it needs no API key: Prometheus scrapes it with none, and
it tells nothing a key protects (queue depths, request counts; no prompt, no job id). Keep the
gateway's port off the public internet, or put ``/metrics`` behind the proxy's own rule.

Each scrape reads the backlog once (``producer.exporter.BacklogCollector``: one SMEMBERS and
two pipelined round trips, whatever the number of models), in FastAPI's thread pool with a
client of its own, so a scrape never blocks the event loop the requests run on. The request
counters are this process's: with ``gateway.workers`` > 1 each uvicorn process counts its own
and a scrape reaches one of them; the backlog is the same from any.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer import metrics as m
from producer.exporter import BacklogCollector
from producer.settings import Settings

#: The route label of a request no route matched (a 404), so that scanners cannot make new series.
NO_ROUTE = "other"


class RequestMetrics:
    """ASGI middleware: counts each HTTP request by route template, method and status, and times it
    until its response starts. Pure ASGI (not ``BaseHTTPMiddleware``): streamed responses and the
    gateway's client-disconnect detection pass through untouched."""

    def __init__(self, app: ASGIApp, requests: Counter, duration: Histogram) -> None:
        self.app = app
        self._requests = requests
        self._duration = duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}  # an exception before the response started is a 500

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self._duration.labels(_route(scope), scope["method"]).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self._requests.labels(_route(scope), scope["method"], str(status["code"])).inc()


def _route(scope: Scope) -> str:
    """The matched route's path template (Starlette puts the route in the scope), never the raw path."""
    route: Any = scope.get("route")
    return getattr(route, "path", None) or NO_ROUTE


def mount(app: FastAPI, settings: Settings) -> None:
    """Add ``GET /metrics`` (no API key) and the request counting to ``app``."""
    disable_created_metrics()  # no *_created series beside each counter: nothing here reads them
    registry = CollectorRegistry()
    requests = Counter(m.GATEWAY_REQUESTS.name, m.GATEWAY_REQUESTS.help, m.GATEWAY_REQUESTS.labels,
                       registry=registry)  # fmt: skip
    duration = Histogram(m.GATEWAY_REQUEST_DURATION.name, m.GATEWAY_REQUEST_DURATION.help,
                         m.GATEWAY_REQUEST_DURATION.labels, registry=registry, buckets=m.LATENCY_BUCKETS_S)
    # Its own small pool: the scrape runs in a thread, the requests' async client stays on the loop.
    registry.register(BacklogCollector(redis.Redis.from_url(settings.redis.url, max_connections=4), settings))
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def get_metrics() -> Response:  # sync: FastAPI runs it in its thread pool, off the event loop
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    app.add_middleware(RequestMetrics, requests=requests, duration=duration)
