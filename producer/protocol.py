"""The job and result protocol, defined once: producers build these, workers parse them.

On the wire a job is ``CompletionJob | ChatJob`` dumped to JSON (``kind`` tells them apart)
and a result is ``JobResult`` dumped to JSON. Nothing here imports Celery or vLLM.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown fields are refused: a misspelt "max_token" must not silently do nothing.
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _utf8_only(cls, value: Any) -> Any:
        # A lone UTF-16 surrogate ("\ud800") is a valid Python str but not UTF-8: it would
        # fail later, where Redis or the tokenizer encodes it, far from the producer.
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"holds a lone surrogate at character {exc.start}: not valid UTF-8 text") from None
        return value


class JsonSchema(_Strict):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    #: The JSON Schema the output must match (OpenAI's field name is ``schema``).
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class ResponseFormat(_Strict):
    """As OpenAI's ``response_format``: ``text``, ``json_object``, or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema', and only then")
        return self


class Sampling(_Strict):
    """Sampling parameters, named and bounded as in vLLM's OpenAI server.

    A field left ``None`` takes the model's ``generation_config.json`` default, then vLLM's,
    as ``vllm serve`` does. ``max_tokens=None`` means what is left of the context.
    ``logprobs`` takes the completions form (an int, 0-20 alternatives per token) in
    completion jobs and the chat form (``True`` plus ``top_logprobs``) in chat jobs.
    """

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False
    #: Choices to generate for the prompt; usage sums their tokens, as vLLM's server does.
    n: int = Field(1, ge=1, le=16)
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    #: Token id -> bias added to its logit, -100..100 (as OpenAI's ``logit_bias``).
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300
    )
    #: Keep only the last N prompt tokens (text prompts).
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Sampling:
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.top_logprobs is not None and self.logprobs is not True:
            raise ValueError("top_logprobs needs logprobs=True (the chat form)")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class ImageURL(_Strict):
    #: A ``data:image/png;base64,...`` URI (png, jpeg, webp), or an http(s) URL on a host
    #: that the workers' ``images.allowed_url_hosts`` allows.
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    """One OpenAI-style message; ``content`` is a string or a list of content parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(value, list) and not value:
            raise ValueError("content must hold at least one part")
        return value


def _new_id() -> str:
    return uuid.uuid4().hex


class _Job(_Strict):
    id: str = Field(default_factory=_new_id, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    #: The served model name (``model.served_name`` of the workers that should run it).
    model: str = Field(min_length=1, max_length=256)
    sampling: Sampling = Field(default_factory=Sampling)
    #: Epoch seconds when the producer built the job.
    created_at: float = Field(default_factory=time.time)
    #: 0-9, a higher number runs first: taken from Redis first, scheduled first by vLLM among
    #: waiting requests. None: ``queue.default_priority`` (5), set at submit.
    priority: int | None = Field(None, ge=0, le=9)
    #: Seconds from submit until the job expires: still queued then, it never runs; running,
    #: it is aborted and ends with its partial output (``JobExpired``). Or ``deadline``.
    timeout_s: float | None = Field(None, gt=0)
    #: The same as an absolute time, epoch seconds. Neither: ``queue.default_timeout_s``.
    deadline: float | None = Field(None, gt=0)
    #: Publish the job's new tokens as they are produced, each engine step's as one entry of
    #: the Redis stream ``vqueue:stream:<id>`` (``Client.stream`` reads it; ``producer.streams``).
    #: The result is the same as without it. False: only the final result, nothing per token.
    stream: bool = False

    @model_validator(mode="after")
    def _one_deadline(self) -> _Job:
        if self.timeout_s is not None and self.deadline is not None:
            raise ValueError("give timeout_s (seconds from submit) or deadline (epoch seconds), not both")
        return self


class CompletionJob(_Job):
    """Continue ``prompt`` (as ``/v1/completions``)."""

    @model_validator(mode="after")
    def _completion_logprobs(self) -> CompletionJob:
        if isinstance(self.sampling.logprobs, bool):
            raise ValueError("sampling.logprobs: completion jobs take an integer (0-20 alternatives per token), "
                             "as /v1/completions does; True/top_logprobs is the chat form")
        return self

    kind: Literal["completion"] = "completion"
    #: Text, or token ids (as ``/v1/completions`` accepts).
    prompt: str | list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class ChatJob(_Job):
    """Answer a conversation (as ``/v1/chat/completions``), rendered with the model's chat template."""

    kind: Literal["chat"] = "chat"
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _chat_logprobs(self) -> ChatJob:
        if self.sampling.logprobs is not None and not isinstance(self.sampling.logprobs, bool):
            raise ValueError("sampling.logprobs: chat jobs take True/False plus top_logprobs (0-20), "
                             "as /v1/chat/completions does")
        return self

    def image_urls(self) -> list[str]:
        return [p.image_url.url for m in self.messages if not isinstance(m.content, str)
                for p in m.content if isinstance(p, ImagePart)]


Job = Annotated[CompletionJob | ChatJob, Field(discriminator="kind")]
JOB_ADAPTER: TypeAdapter[CompletionJob | ChatJob] = TypeAdapter(Job)


def parse_job(data: object) -> CompletionJob | ChatJob:
    """A job from its JSON-decoded form; raises ``pydantic.ValidationError`` naming the field."""
    return JOB_ADAPTER.validate_python(data)


class _Lenient(BaseModel):
    # Results are read by producers that may be older than the worker: fields they do not
    # know yet are ignored rather than refused (jobs stay strict: the worker must refuse).
    model_config = ConfigDict(extra="ignore")


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Usage(_Lenient):
    """Token counts from the engine, named as vLLM's ``UsageInfo``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Lenient):
    """Epoch seconds of each step of the job's life (the engine's own clock for its steps)."""

    #: The job entered Redis (its queue).
    enqueued_at: float
    #: A worker picked it up (took it from the queue and started its task).
    started_at: float
    #: The engine process called ``engine.generate`` for it.
    handed_at: float | None = None
    #: vLLM's scheduler first gave it a step (``RequestOutput.metrics.scheduled_ts``).
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float


class AssistantMessage(_Lenient):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(_Lenient):
    token: str
    token_id: int
    logprob: float


class TokenLogprob(_Lenient):
    """One generated token's log-probability and the most likely alternatives at its step."""

    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Choice(_Lenient):
    index: int = 0
    text: str | None = None  # completion jobs
    message: AssistantMessage | None = None  # chat jobs
    finish_reason: FinishReason
    #: The stop string or token id that ended the choice, if one did.
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


class JobResult(_Lenient):
    """What a worker writes back for a job that ran."""

    id: str
    model: str
    kind: Literal["completion", "chat"]
    choices: list[Choice]
    usage: Usage
    timings: Timings
    worker: str
    attempt: int = 1
    #: "succeeded", or how a job stopped early: then this is its partial output, the
    #: ``partial`` of a ``JobCancelled`` / ``JobExpired`` (``finish_reason`` "abort").
    outcome: Literal["succeeded", "cancelled", "expired"] = "succeeded"

    @property
    def text(self) -> str:
        """The first choice's text: the completion, or the assistant message's content."""
        choice = self.choices[0]
        return choice.text if choice.message is None else choice.message.content

    @property
    def message(self) -> AssistantMessage | None:
        return self.choices[0].message

    @property
    def finish_reason(self) -> FinishReason:
        return self.choices[0].finish_reason


class StreamChoice(_Lenient):
    """What one choice produced in one engine step: ``text`` is the new text only (the delta)."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    #: Set on the choice's last chunk ("stop", "length", "abort"), else None.
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class StreamChunk(_Lenient):
    """One entry of a streaming job's stream: what one engine step produced for it.

    ``choices`` holds only the choices that produced output in that step (with ``n`` > 1 not
    every index is in every chunk). Joined in order, a choice's chunks are its result's text,
    token ids and logprobs. ``attempt`` is the job's attempt: where a worker died mid-job the
    job starts over elsewhere, and its chunks then carry the next attempt from the first token
    again; a reader that sees the attempt go up discards what it had of the earlier one.
    """

    attempt: int = 1
    choices: list[StreamChoice]


StreamOutcome = Literal["succeeded", "failed", "cancelled", "expired"]


class StreamEnd(_Lenient):
    """The last entry of a job's stream, written once its outcome is stored: a reader that sees
    it can read the result (``Client.result``: usage, timings) or the job's error at once."""

    end: Literal[True] = True
    outcome: StreamOutcome


class WorkerInfo(_Lenient):
    """What a live worker announces in Redis (renewed by its heartbeat)."""

    hostname: str
    served_name: str
    source: str
    max_model_len: int
    modalities: list[str]
    max_in_flight: int
    started_at: float
    #: Jobs running in its pool threads at its last heartbeat.
    in_flight: int = 0
    #: Jobs it finished per second over the last minute, at its last heartbeat.
    completions_per_s: float = 0.0


class ModelInfo(_Lenient):
    """A model some live worker serves: the content of vLLM's ``/v1/models`` entry, and more."""

    id: str
    source: str
    max_model_len: int
    modalities: list[str]
    workers: list[str]
    started_at: float  # the earliest of its workers


class DeadLetter(_Lenient):
    """One entry of ``vqueue:dead-letters``, kept for operators: a message no worker could read
    (``malformed``), or a job whose runs killed the engine ``worker.max_engine_deaths`` times
    (``quarantined``; ``raw_b64`` is its job, which ``vqueue dead retry`` submits again)."""

    kind: Literal["malformed", "quarantined"] = "malformed"
    queue: str
    job_id: str | None = None
    error_type: str
    field: str | None = None
    reason: str
    #: The message's first bytes (at most ``DEAD_LETTER_RAW_BYTES``), base64; ``raw_size`` is the whole size.
    raw_b64: str
    raw_size: int
    at: float
    worker: str
    #: Quarantined jobs: how many times a worker started it.
    attempts: int | None = None


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired", "quarantined"]
#: States after which nothing more happens to a job.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired", "quarantined"})


class Attempt(_Lenient):
    """One start of a job: its number (1, 2, ...), the worker and when it picked the job up."""

    number: int
    worker: str
    picked_up_at: float


class JobRecord(_Lenient):
    """Everything known about one job (``Client.job`` / ``vqueue show``): its record in Redis
    (``vqueue:job:<id>``) read together with its result.

    The timeline: ``enqueued_at`` (entered Redis) -> ``picked_up_at`` (a worker took it) ->
    ``handed_at`` (the engine process called ``generate``) -> ``scheduled_at`` (vLLM's scheduler
    first ran it) -> ``first_token_at`` -> ``finished_at``; unknown steps are None.
    """

    id: str
    state: JobState
    model: str | None = None
    kind: str | None = None
    priority: int | None = None
    deadline: float | None = None
    enqueued_at: float | None = None
    picked_up_at: float | None = None
    handed_at: float | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    engine_deaths: int = 0
    last_death: str | None = None
    worker: str | None = None
    usage: Usage | None = None
    finish_reason: FinishReason | None = None
    #: Why it failed, was cancelled or expired (``error_type: message``).
    error: str | None = None

    def _between(self, start: float | None, end: float | None) -> float | None:
        return end - start if start is not None and end is not None else None

    @property
    def wait_in_redis_s(self) -> float | None:
        return self._between(self.enqueued_at, self.picked_up_at)

    @property
    def wait_in_engine_s(self) -> float | None:
        return self._between(self.handed_at, self.scheduled_at)

    @property
    def time_to_first_token_s(self) -> float | None:
        """From entering Redis to the first token: what a producer waited for it."""
        return self._between(self.enqueued_at, self.first_token_at)

    @property
    def decode_s(self) -> float | None:
        return self._between(self.first_token_at, self.finished_at)

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second of decoding (after the first token)."""
        decode = self.decode_s
        if self.usage is None or not decode:
            return None
        return (self.usage.completion_tokens - 1) / decode if self.usage.completion_tokens > 1 else None

    def derived(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in
                ("wait_in_redis_s", "wait_in_engine_s", "time_to_first_token_s", "decode_s", "tokens_per_s")}


class WorkerLoad(_Lenient):
    hostname: str
    in_flight: int
    max_in_flight: int
    completions_per_s: float


class QueueStats(_Lenient):
    """One model's queue as ``vqueue queue`` shows it."""

    model: str
    #: Jobs waiting (not yet taken by a worker), by priority; priorities with none left out.
    waiting_by_priority: dict[int, int]
    waiting: int
    #: Seconds the oldest waiting job has waited (None: none waiting or no record of it).
    oldest_waiting_s: float | None
    max_backlog: int
    workers: list[WorkerLoad]
    in_flight: int
    completions_per_s: float


#: How much of an unreadable message a dead-letter entry keeps.
DEAD_LETTER_RAW_BYTES = 64 * 1024
