"""The ASGI app: vLLM's OpenAI endpoints in front of vqueue's Redis queues.

Stateless (any number of gateways may serve one Redis) and async all the way: one
``producer.aio.AsyncClient`` per process (one Redis pool, one pub/sub connection for all
waiting requests). Each request is one job: submitted, awaited (or streamed), answered in
vLLM's shapes (``producer.openai_api``). A client that goes away, or a request whose own timeout
passes, cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway import batches, files, metrics
from gateway.errors import ApiError, bad_request, not_found, response, unauthorized
from producer import openai_api as protocol
from producer.aio import AsyncClient
from producer.errors import BrokerUnavailable, InvalidJob, JobFailed, JobTimeout, QueueFull, RedisFull
from producer.openai_api import ChatCompletionRequest, CompletionRequest, failure, version
from producer.protocol import ChatJob, CompletionJob, JobResult, ModelInfo, StreamChunk
from producer.settings import Settings, get_settings

log = logging.getLogger("vqueue.gateway")
T = TypeVar("T")

#: A job id, as ``producer.protocol`` allows it (X-Request-Id becomes one).
_JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: Grace after a job's own deadline for its JobExpired (with partial output) to arrive.
_DEADLINE_GRACE_S = 5.0
#: Cancels sent for requests that went away: kept referenced until done (no await in a cancelled task).
_background: set[asyncio.Task[Any]] = set()


class Gateway:
    """The per-process state: settings, the async client, a short cache of served models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = AsyncClient(settings, max_connections=settings.gateway.redis_max_connections)
        self.fingerprint = protocol.system_fingerprint()
        self._models: list[ModelInfo] = []
        self._models_at = -1e9
        self._models_reading: asyncio.Future[None] | None = None
        self._keys = [k.get_secret_value().encode() for k in settings.gateway.api_keys]

    async def models(self, fresh: bool = False) -> list[ModelInfo]:
        """The served models, read at most every ``gateway.models_cache_s``; one read in flight
        for all the requests that find the list stale at once (not one SCAN each)."""
        if fresh or time.monotonic() - self._models_at > self.settings.gateway.models_cache_s:
            if self._models_reading is None or self._models_reading.done():
                self._models_reading = asyncio.ensure_future(self._read_models())
            await asyncio.shield(self._models_reading)
        return self._models

    async def _read_models(self) -> None:
        self._models = await self.client.models()
        self._models_at = time.monotonic()

    def key_ok(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        scheme, _, sent = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Compare with every key, always: the time taken says nothing about which key is closest.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(sent.strip().encode(), key)
        return ok

    async def model_for(self, requested: str | None) -> str:
        served = await self.models()
        names = [m.id for m in served]
        if requested is None:
            if len(names) == 1:
                return names[0]
            raise bad_request("model", f"`model` is required: live workers serve {', '.join(names) or 'no model'}.")
        if requested not in names:
            # The cache may be a second old: a worker that just started is seen at once.
            names = [m.id for m in await self.models(fresh=True)]
            if requested not in names:
                raise not_found(requested, names)
        return requested

    def cancel_later(self, job_id: str, why: str) -> None:
        """Cancel ``job_id`` from a task of its own (the request's task may be being cancelled)."""

        async def cancel() -> None:
            try:
                said = await self.client.cancel(job_id)
                log.info("job %s cancelled (%s): %s", job_id, why, said)
            except Exception:
                log.warning("could not cancel job %s (%s)", job_id, why, exc_info=True)

        task = asyncio.get_running_loop().create_task(cancel())
        _background.add(task)
        task.add_done_callback(_background.discard)


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


async def require_key(request: Request) -> None:
    if not gateway_of(request).key_ok(request.headers.get("authorization")):
        raise unauthorized()


# -- requests ------------------------------------------------------------------------------


async def read_body(request: Request, model: type[protocol._Request]) -> Any:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(None, f"The body is not JSON ({exc}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise bad_request(None, "The body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise protocol.validation_error(exc) from None


def job_id_for(request: Request, body: protocol._Request) -> str:
    """X-Request-Id (or the body's ``request_id``) becomes the job id: a retry with the same id
    is the same job, never a second run. None given: a fresh one."""
    given = request.headers.get("x-request-id") or body.request_id
    if given is None:
        return uuid.uuid4().hex
    if not _JOB_ID.match(given):
        raise bad_request("X-Request-Id", "X-Request-Id must be 1-128 characters of A-Z a-z 0-9 _ . : - "
                          "(it becomes the job id)")
    return given


def wait_s(gateway: Gateway, body: protocol._Request) -> float:
    if body.timeout_s is not None:
        return body.timeout_s + _DEADLINE_GRACE_S
    return gateway.settings.gateway.request_timeout_s


async def submit(gateway: Gateway, job: CompletionJob | ChatJob) -> bool:
    try:
        _, new = await gateway.client.submit(job)
    except ValidationError as exc:
        raise protocol.validation_error(exc, strip=("sampling",)) from None
    except InvalidJob as exc:
        raise bad_request(protocol.param_of(tuple(exc.field.split(".")), ("sampling",)), str(exc)) from None
    if not new:
        log.info("job %s: a retry of a known request id; answering with that job", job.id)
    return new


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body is read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(gateway: Gateway, request: Request, job_id: str, pending: Awaitable[T],
                      when: str = "") -> asyncio.Future[T]:
    """``pending``, finished, unless the client goes away first: then its job is cancelled (499)."""
    task = asyncio.ensure_future(pending)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    if not task.done():
        gateway.cancel_later(job_id, f"the client disconnected{when}")
        raise ApiError(499, "ClientClosedRequest", f"client closed the request; job {job_id} cancelled")
    return task


async def outcome_or_gone(gateway: Gateway, request: Request, job_id: str, timeout: float) -> JobResult:
    """The job's result; the client going away or the timeout passing cancels the job."""
    waiting = await unless_gone(gateway, request, job_id, gateway.client.outcome(job_id, timeout))
    try:
        outcome = waiting.result()
    except JobTimeout:
        gateway.cancel_later(job_id, f"no result within the request's {timeout:g} s")
        raise ApiError(504, "GatewayTimeoutError", f"job {job_id} has no result after {timeout:g} s; it was "
                       "cancelled. Give the request a longer `timeout_s`, or raise gateway.request_timeout_s."
                       ) from None
    if isinstance(outcome, JobFailed):
        raise failure(outcome)
    return outcome


async def first_chunk_or_gone(gateway: Gateway, request: Request, job_id: str,
                              chunks: AsyncIterator[StreamChunk]) -> StreamChunk | None:
    """The stream's first chunk (None: it ended without one); errors, a timeout or the client going
    away as in ``outcome_or_gone``."""
    first = await unless_gone(gateway, request, job_id, anext(chunks), " before the first token")
    try:
        return first.result()
    except StopAsyncIteration:
        return None
    except JobTimeout:
        gateway.cancel_later(job_id, "no output within the request's timeout")
        raise ApiError(504, "GatewayTimeoutError", f"job {job_id} produced nothing within the request's timeout; it "
                       "was cancelled. Give the request a longer `timeout_s`.") from None
    except JobFailed as exc:
        raise failure(exc) from None


# -- streaming -----------------------------------------------------------------------------


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Streamer:
    """vLLM's SSE chunks for one job: one event per choice per engine step, the last of each
    choice with ``finish_reason``, a usage chunk if asked, then ``data: [DONE]``."""

    def __init__(self, gateway: Gateway, body: protocol._Request, job: CompletionJob | ChatJob, response_id: str,
                 created: int) -> None:
        self.gateway = gateway
        self.body = body
        self.job = job
        self.chat = isinstance(job, ChatJob)
        self.head = {"id": response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": created, "model": job.model}
        self.top_n = (job.sampling.top_logprobs or 0) if self.chat else 0
        #: Completion choices' text so far (logprobs' text_offset counts from the choice's start).
        self.offsets: dict[int, int] = {}
        self.done: set[int] = set()

    def _choice(self, c: Any, last: bool) -> dict[str, Any]:
        if self.chat:
            logprobs = protocol.chat_logprobs(c.logprobs, self.top_n) if c.logprobs is not None else None
            out = {"index": c.index, "delta": {"content": c.text}, "logprobs": logprobs,
                   "finish_reason": c.finish_reason}
        else:
            logprobs = None
            if c.logprobs is not None:
                logprobs = protocol.completion_logprobs(c.logprobs, self.offsets.get(c.index, 0))
            self.offsets[c.index] = self.offsets.get(c.index, 0) + len(c.text)
            out = {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        if last or not self.chat:
            out["stop_reason"] = c.stop_reason
        if not self.chat:
            out["prompt_token_ids"] = None
        out["token_ids"] = None
        return out

    async def events(self, first: StreamChunk | None, rest: AsyncIterator[StreamChunk]) -> AsyncIterator[str]:
        job_id = self.job.id
        finished = False
        attempt: int | None = None

        async def chunks() -> AsyncIterator[StreamChunk]:
            if first is not None:
                yield first
                async for chunk in rest:
                    yield chunk

        try:
            if self.chat:
                for i in range(self.job.sampling.n):
                    yield _sse({**self.head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}],
                                "prompt_token_ids": None, "prompt_text": None})
            include_usage = self.body.include_usage
            async for chunk in chunks():
                if attempt is not None and chunk.attempt != attempt:
                    # Its worker died and it started over: what was sent cannot be taken back.
                    raise ApiError(500, "InternalServerError", f"job {job_id} started over on another worker "
                                   f"(attempt {chunk.attempt}) after streaming part of attempt {attempt}; its result "
                                   "(same X-Request-Id, without stream) will be whole")
                attempt = chunk.attempt
                for c in chunk.choices:
                    last = c.finish_reason is not None
                    event = {**self.head, "choices": [self._choice(c, last)]}
                    if last and not include_usage and self._all_done(c.index):
                        event["system_fingerprint"] = self.gateway.fingerprint
                    yield _sse(event)
            if include_usage:
                outcome = await self.gateway.client.outcome(job_id, _DEADLINE_GRACE_S)
                if isinstance(outcome, JobFailed):
                    raise failure(outcome)
                u = outcome.usage
                yield _sse({**self.head, "choices": [], "usage": {"prompt_tokens": u.prompt_tokens,
                            "total_tokens": u.total_tokens, "completion_tokens": u.completion_tokens},
                            "system_fingerprint": self.gateway.fingerprint})
            finished = True
        except JobTimeout:
            finished = True
            self.gateway.cancel_later(job_id, "the stream's timeout passed")
            yield _sse(ApiError(504, "GatewayTimeoutError", f"job {job_id} did not finish within the request's "
                                "timeout; it was cancelled").body())
        except JobFailed as exc:
            finished = True
            yield _sse(failure(exc).body())
        except ApiError as exc:
            finished = True
            yield _sse(exc.body())
        except BrokerUnavailable as exc:
            finished = True
            yield _sse(ApiError(503, "ServiceUnavailableError", str(exc)).body())
        finally:
            if not finished:  # the client went away mid-stream (or the server is stopping)
                self.gateway.cancel_later(job_id, "the client disconnected mid-stream")
        yield "data: [DONE]\n\n"

    def _all_done(self, index: int) -> bool:
        """Whether every choice has ended, ``index`` now too (the stream's last choice chunk)."""
        self.done.add(index)
        return len(self.done) == self.job.sampling.n


# -- the app -------------------------------------------------------------------------------


async def _run(request: Request, kind: type[protocol._Request]) -> Response:
    gateway = gateway_of(request)
    body = await read_body(request, kind)
    job_id = job_id_for(request, body)
    model = await gateway.model_for(body.model)
    job = body.job(job_id, model)  # type: ignore[attr-defined]
    created = protocol.now()
    chat = isinstance(job, ChatJob)
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
    if body.stream:
        job = job.model_copy(update={"stream": True})
        await submit(gateway, job)
        chunks = gateway.client.stream(job_id, wait_s(gateway, body))
        # The answer starts with the job's first output: a job that fails first (a prompt over the
        # context, say) is a plain JSON error with its status, as vLLM's, not a 200 stream.
        first = await first_chunk_or_gone(gateway, request, job_id, chunks)
        return StreamingResponse(_Streamer(gateway, body, job, response_id, created).events(first, chunks),
                                 media_type="text/event-stream")
    await submit(gateway, job)
    result = await outcome_or_gone(gateway, request, job_id, wait_s(gateway, body))
    if chat:
        top_n = job.sampling.top_logprobs or 0
        return JSONResponse(protocol.chat_response(result, response_id, created, gateway.fingerprint, top_n))
    return JSONResponse(protocol.completion_response(result, response_id, created, gateway.fingerprint))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app (``uvicorn --factory gateway.app:create_app``; ``vqueue gateway`` runs it)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway(settings)
        app.state.batches = batches.BatchService(settings)  # /v1/files, /v1/batches and their supervisor
        await app.state.batches.start()
        try:
            yield
        finally:
            await app.state.batches.aclose()
            await app.state.gateway.client.aclose()

    app = FastAPI(title="vqueue gateway", version=version(), lifespan=lifespan)
    # vLLM's server defaults: any origin, no credentials (browsers' cross-origin calls work alike).
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=False, allow_methods=["*"],
                       allow_headers=["*"])
    metrics.mount(app, settings)  # GET /metrics, no API key (as vllm serve's); counts every request

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return response(exc)

    @app.exception_handler(BrokerUnavailable)
    async def _redis_down(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return response(ApiError(503, "ServiceUnavailableError", str(exc)))

    @app.exception_handler(RedisFull)
    async def _redis_full(request: Request, exc: RedisFull) -> JSONResponse:
        retry = str(settings.gateway.retry_after_s)
        return response(ApiError(503, "ServiceUnavailableError", str(exc), None, {"Retry-After": retry}))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        retry = str(settings.gateway.retry_after_s)
        return response(ApiError(429, "RateLimitError", str(exc), None, {"Retry-After": retry}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = protocol.param_of(tuple(first.get("loc", ())))
        return response(bad_request(param or None, f"{param}: {first.get('msg')}"))

    @app.get("/health")
    async def health(request: Request) -> Response:
        """200 (empty, as vLLM's) while Redis answers and some live worker serves a model."""
        gateway = gateway_of(request)
        await gateway.client.ping()
        if not await gateway.client.workers():
            raise ApiError(503, "ServiceUnavailableError", "Redis answers but no live worker serves any model; start "
                           "one with `celery -A worker worker`.")
        return Response(status_code=200)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": version()}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        models = await gateway_of(request).client.models()
        return {"object": "list", "data": [protocol.model_card(m) for m in models]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _run(request, CompletionRequest)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _run(request, ChatCompletionRequest)

    v1.include_router(files.router)
    v1.include_router(batches.router)
    app.include_router(v1)
    return app


__all__ = ["create_app"]
